"""ACE-Step 1.5 (music): `AceStepPipeline` accelerated, the reference loop's call of the model (channels-first
latents, diffusers' (B, T, C) inside), and the family record."""
from __future__ import annotations

import functools
import logging
import math

import torch

from .. import families
from ..cache import Stages
from ..fast.ace_step import FastAceStep, check_inputs
from ..guidance import APG
from ..models import ace_step_checkpoints as ace_step
from ..models.ace_step import AceStep, AceStepConfig, rope_tables
from ..sampling import doubled
from .base import Accelerated, check_call

log = logging.getLogger("ditengine")


def ace_step_forward(model, spec: AceStep, noise: torch.Tensor, use_cfg: bool, *conditioning, cache=None, **named):
    """The fused denoiser's checks; the loop is channels-first (B, C, T), the model takes diffusers' (B, T, C)."""
    check_inputs(spec.config, next(model.parameters()).device, noise, use_cfg, **named)
    enc = doubled(named["encoder_hidden_states"], named.get("null_encoder_hidden_states"), use_cfg)
    context = named["context_latents"].transpose(1, 2)
    context = torch.cat([context, context]) if use_cfg else context
    dtype = next(model.parameters()).dtype
    enc, context = enc.to(dtype), context.to(dtype)

    def forward(x_in, t, step):
        n = len(x_in)
        if cache is not None:
            out = cache(ace_step_stages(spec, x_in.transpose(1, 2), t, enc[:n], context[:n]), step)
        else:
            out = model(x_in.transpose(1, 2), timestep=t, timestep_r=t, encoder_hidden_states=enc[:n],
                        context_latents=context[:n])
        return out.transpose(1, 2).contiguous()

    return forward


def ace_step_stages(spec: AceStep, hidden_states, timestep, encoder_hidden_states, context_latents) -> Stages:
    """`AceStep.forward` cut for a step cache (r = t, as the pipeline passes it)."""
    B, T, _ = hidden_states.shape
    t = timestep.to(hidden_states.dtype)
    temb, t6 = spec.timestep_conditioning(t, t)
    x = spec.embed(hidden_states, context_latents)  # (B, T', D)
    cos, sin = rope_tables(x.shape[1], spec.config.head_dim, spec.config.rope_theta, x.device)
    rope = (cos.to(x.dtype), sin.to(x.dtype))
    condition = spec.condition(encoder_hidden_states)
    return Stages(x, [functools.partial(spec.block, i, t6=t6, rope=rope, condition=condition)
                      for i in range(len(spec.layers))],
                  lambda x: spec.unembed(x, temb, T), [[b.self_attn, b.cross_attn, b.mlp] for b in spec.layers], spec)


def recognises(state: dict) -> bool:
    """ACE-Step's own keys: its condition embedder is one Linear (`condition_embedder.weight`; Wan's is a module of
    several), its 1-D conv patching, or the original checkpoint's decoder."""
    return any(k in ("condition_embedder.weight", "condition_embedder.bias")
               or k.startswith(("proj_in_conv.", "proj_out_conv.", "decoder.layers.")) for k in state)


class AcceleratedAceStepPipeline(Accelerated):
    """Called like `AceStepPipeline` (ACE-Step 1.5: text, lyrics, duration, the turbo or the base/SFT DiT),
    returning what it returns; the denoising loop runs in ditengine.

    The prompt and lyrics are encoded, the source and timbre latents, chunk mask and packed condition built, and
    the audio decoded and loudness-normalised by the pipeline's own components, once per call, as the pipeline
    does; the latents are drawn as it draws them. The loop is the pipeline's: its shifted sigma grid (or your
    `timesteps`) through the flow-match Euler step, and for the base model (guidance_scale > 1, not turbo) APG
    on [condition; null condition] at the steps inside [cfg_interval_start, cfg_interval_end] of 1 - t, the
    others on the condition alone. In fp32 the latents equal the pipeline's within 1e-4 relative.

    Step callbacks, `audio_codes` (the 5 Hz planner's codes), `audio_cover_strength < 1` (a second condition
    per step) and `attention_kwargs` (LoRA scales) are not supported: they raise a ValueError.
    """

    @torch.no_grad()
    def __call__(self, prompt=None, lyrics="", audio_duration: float = 60.0, vocal_language="en",
                 num_inference_steps: int = 8, guidance_scale: float = 7.0, shift: float = 3.0, generator=None,
                 latents: torch.Tensor | None = None, output_type: str | None = "pt", return_dict: bool = True,
                 callback=None, callback_steps: int | None = 1, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), instruction: str | None = None,
                 max_text_length: int = 256, max_lyric_length: int = 2048, bpm: int | None = None,
                 keyscale: str | None = None, timesignature: str | None = None, task_type: str = "text2music",
                 track_name: str | None = None, complete_track_classes=None, src_audio: torch.Tensor | None = None,
                 reference_audio: torch.Tensor | None = None, audio_codes=None, repainting_start: float | None = None,
                 repainting_end: float | None = None, audio_cover_strength: float = 1.0,
                 cfg_interval_start: float = 0.0, cfg_interval_end: float = 1.0, timesteps=None,
                 attention_kwargs: dict | None = None):
        check_call(num_inference_steps, guidance_scale)
        from diffusers.pipelines.pipeline_utils import AudioPipelineOutput

        pipe = self.pipe
        for name, value in (("callback", callback), ("callback_on_step_end", callback_on_step_end),
                            ("audio_codes", audio_codes), ("attention_kwargs", attention_kwargs or None)):
            if value is not None:
                raise ValueError(f"{name}: not supported by the accelerated pipeline (the loop is a static plan); "
                                 "call the pipeline itself for it")
        if audio_cover_strength < 1.0 and task_type == "cover":
            raise ValueError("audio_cover_strength < 1: not supported by the accelerated pipeline (a second "
                             "condition per step); call the pipeline itself for it")
        if not isinstance(prompt, (str, list)):
            raise ValueError("prompt: expected a string or a list of strings, as AceStepPipeline takes it")
        batch = 1 if isinstance(prompt, str) else len(prompt)
        device, dtype = self.device, pipe.transformer.dtype
        if pipe.is_turbo and guidance_scale > 1.0:
            log.warning("ditengine: guidance_scale %s is ignored for turbo (guidance-distilled) ACE-Step checkpoints",
                        guidance_scale)
            guidance_scale = 1.0
        pipe.check_inputs(prompt=prompt, lyrics=lyrics, task_type=task_type, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, shift=shift, audio_cover_strength=audio_cover_strength,
                          cfg_interval_start=cfg_interval_start, cfg_interval_end=cfg_interval_end,
                          repainting_start=repainting_start, repainting_end=repainting_end)
        if instruction is None:
            instruction = pipe._get_task_instruction(task_type=task_type, track_name=track_name,
                                                     complete_track_classes=complete_track_classes)
        has_src_audio = src_audio is not None
        if has_src_audio and (audio_duration is None or audio_duration <= 0):
            audio_duration = src_audio.shape[-1] / pipe.sample_rate
        if audio_duration is None or audio_duration <= 0:
            audio_duration = 60.0
        text, text_mask, lyric, lyric_mask = pipe.encode_prompt(
            prompt=prompt, lyrics=lyrics, device=device, vocal_language=vocal_language, audio_duration=audio_duration,
            instruction=instruction, bpm=bpm, keyscale=keyscale, timesignature=timesignature,
            max_text_length=max_text_length, max_lyric_length=max_lyric_length)
        src_latents, length = pipe.prepare_src_latents(
            device=device, dtype=dtype, batch_size=batch, src_audio=src_audio,
            latent_length=math.ceil(audio_duration * pipe.latents_per_second), task_type=task_type)
        if reference_audio is not None:
            timbre, timbre_order = pipe.prepare_reference_audio_latents(
                reference_audio=reference_audio, batch_size=batch, device=device, dtype=dtype)
        else:  # the learned silence latent, as the pipeline uses it (zeros would be out of distribution)
            frames = math.ceil(30 * pipe.latents_per_second)
            timbre = pipe.condition_encoder.silence_latent[:, :frames].to(device=device, dtype=dtype).expand(
                batch, -1, -1).contiguous()
            timbre_order = torch.arange(batch, device=device, dtype=torch.long)
        condition, _ = pipe.condition_encoder(
            text_hidden_states=text, text_attention_mask=text_mask, lyric_hidden_states=lyric,
            lyric_attention_mask=lyric_mask, refer_audio_acoustic_hidden_states_packed=timbre,
            refer_audio_order_mask=timbre_order)
        chunk_mask = pipe._build_chunk_mask(
            task_type=task_type, latent_length=length, batch_size=batch, device=device, dtype=dtype,
            acoustic_dim=pipe.transformer.config.audio_acoustic_hidden_dim, repainting_start=repainting_start,
            repainting_end=repainting_end, has_src_audio=has_src_audio)
        if task_type == "repaint" and has_src_audio:
            silence, _ = pipe.prepare_src_latents(device=device, dtype=dtype, batch_size=batch, latent_length=length)
            src_latents = torch.where(chunk_mask > 0.5, silence, src_latents)
        context = torch.cat([src_latents, chunk_mask], dim=-1)  # (B, T, C_ctx)
        noise = pipe.prepare_latents(batch_size=batch, audio_duration=length / pipe.latents_per_second, dtype=dtype,
                                     device=device, generator=generator, latents=latents)  # (B, T, C)
        guided = guidance_scale > 1.0 and not pipe.is_turbo
        named = dict(encoder_hidden_states=condition, context_latents=context.transpose(1, 2).contiguous())
        if guided:
            null = getattr(pipe.condition_encoder, "null_condition_emb", None)
            if null is None:
                raise ValueError("guidance_scale > 1 needs the condition encoder's null_condition_emb (a base/SFT "
                                 "checkpoint), or pass guidance_scale=1.0")
            named["null_encoder_hidden_states"] = null.to(device=device, dtype=condition.dtype).expand_as(condition)
        sigmas = pipe._get_timestep_schedule(num_inference_steps=num_inference_steps, shift=shift, device=device,
                                             dtype=torch.float32, timesteps=timesteps)
        # The pipeline guides where cfg_interval_start <= 1 - t <= cfg_interval_end: t in [1 - end, 1 - start].
        interval = (1.0 - cfg_interval_end, 1.0 - cfg_interval_start) if guided else None
        out = self.denoise(noise.transpose(1, 2).contiguous(), len(sigmas),
                           guidance_scale if guided else 1.0, generator,
                           {"sigmas": tuple(sigmas.tolist())}, cfg_interval=interval,
                           guider=APG() if guided else None, **named)
        latents = out.transpose(1, 2).to(dtype)  # (B, T, C), as the pipeline returns them
        if output_type == "latent":
            pipe.maybe_free_model_hooks()
            return AudioPipelineOutput(audios=latents) if return_dict else (latents,)
        audio = pipe.vae.decode(latents.transpose(1, 2)).sample.float()
        peak = audio.abs().amax(dim=[1, 2], keepdim=True)
        if torch.any(peak > 1.0):  # the pipeline's anti-clip, then its -1 dBFS loudness normalisation
            audio = audio / peak.clamp(min=1.0)
        audio = audio * (10.0 ** (-1.0 / 20.0) / audio.abs().amax(dim=[1, 2], keepdim=True).clamp(min=1e-6))
        if output_type == "np":
            audio = audio.cpu().numpy()
        pipe.maybe_free_model_hooks()
        return AudioPipelineOutput(audios=audio) if return_dict else (audio,)


families.register(families.Family(
    name="ace_step", spec=AceStep, config=AceStepConfig, fast=FastAceStep, forward=ace_step_forward,
    reference_cache=True, channels=lambda cfg: cfg.audio_acoustic_hidden_dim, depth=lambda model: len(model.layers),
    diffusers_class="AceStepTransformer1DModel", from_diffusers=ace_step.from_diffusers, recognises=recognises,
    load=families.config_loader(ace_step.load_state_dict),
    pipelines={"AceStepPipeline": AcceleratedAceStepPipeline},
    bench=(lambda name: name.lower().replace("_", "-").startswith("ace-step"),
           "ditengine.bench.ace_step:ace_step_setup"),
    bench_defaults={"cfg_scale": 1.0}))
