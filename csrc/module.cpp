// The Python module ditengine._C. Importing it loads this shared library, whose TORCH_LIBRARY_IMPL blocks
// (one per op file in csrc/) add the native CPU kernels to the ditengine ops; the module itself only
// reports how it was built and what it chose at run time (`ditengine-info`).
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <algorithm>
#include <string>

#include "cpu.h"

// setup.py passes the flags as comma-separated tokens (no quotes or spaces to survive a shell).
#define DITENGINE_STRINGIFY(...) #__VA_ARGS__
#define DITENGINE_STRING(...) DITENGINE_STRINGIFY(__VA_ARGS__)

namespace py = pybind11;

namespace {

std::string compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::dict info;
  info["compiler"] = compiler();
#ifdef DITENGINE_BUILD_FLAGS
  std::string flags = DITENGINE_STRING(DITENGINE_BUILD_FLAGS);
  std::replace(flags.begin(), flags.end(), ',', ' ');
#else
  std::string flags = "unknown";
#endif
  info["flags"] = flags;
  info["isa"] = ditengine::cpu::isa_name(ditengine::cpu::isa());
  info["isa_variants"] = DITENGINE_X86 ? "avx512, avx2, baseline (x86-64)" : "baseline";
#ifdef _OPENMP
  info["openmp"] = std::to_string(_OPENMP);
#else
  info["openmp"] = "off";
#endif
  info["threads"] = at::get_num_threads();
  info["torch"] = TORCH_VERSION;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ditengine native CPU kernels (registered as the CPU implementations of torch.ops.ditengine.*)";
  m.def("build_info", &build_info,
        "How the extension was built and what it runs: compiler, flags, the ISA chosen on this CPU, OpenMP, "
        "intra-op threads, and the torch version it was compiled against.");
  m.def("isa", [] { return std::string(ditengine::cpu::isa_name(ditengine::cpu::isa())); },
        "The vector ISA the kernels run on this CPU: avx512, avx2 or baseline.");
}
