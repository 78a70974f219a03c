"""The digits demo, apart from the engine: a small class-conditional DiT trained on scikit-learn's 8x8 digits and
shipped with the package (`ditengine.load_pretrained("digits")`), with its command lines.

| module | command | does |
|---|---|---|
| `train.py` | `python -m ditengine.demo.train` (or `torchrun`) | trains a DiT (noise prediction or rectified flow) |
| `images.py` | `python -m ditengine.demo.images` | class-conditional samples to a labelled PNG grid |
| `eval.py` | `python -m ditengine.demo.eval` | scores samples with a digit classifier trained on the real data |
| `generate.py` | | the shipped model, the schedulers set up for it, batched generation |
| `data.py`, `distributed.py` | | the digits data set; `torchrun` set-up |

`ditengine.train`, `ditengine.eval`, `ditengine.data`, `ditengine.generate` and `ditengine.distributed` remain as
aliases of these modules (and `python -m ditengine.train` / `ditengine.eval` still run).
"""
