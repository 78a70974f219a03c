"""A tiny, offline diffusers `AceStepPipeline` (ACE-Step 1.5) with random-init components, for the tests.

Every component mirrors the kind the real pipeline loads (Qwen3 tokenizer and text encoder, the condition encoder,
the Oobleck VAE, the DiT, the flow-matching Euler scheduler), shrunk to a few thousand parameters and built
without network access. Everything is deterministic in `seed` and leaves the global RNG untouched.

Only the tests that call these need diffusers and transformers: each call skips its own test when either is
missing, so a test module that imports this one never skips as a whole.

Sizes (defaults): the VAE runs at 16 Hz with hop 4, so `latents_per_second = 4`: 5.25 s gives T = 21 latent frames,
5.75 s gives T = 23. Latent width C = 8; the DiT input is 3 * C = 24 channels (silence-latent context, chunk mask,
noisy latent).
"""
import math
import warnings

import pytest
import torch

# The end-of-text token the pipeline writes into its templates; Qwen's tokenizer also pads with it.
END_OF_TEXT = "<|endoftext|>"

# Qwen3-Embedding-0.6B is 1024 wide; the tiny stand-in is 32 wide.
TEXT_HIDDEN = 32

# Audio rate and hop of the tiny VAE: latents_per_second = SAMPLING_RATE / prod(DOWNSAMPLING_RATIOS) = 4.
SAMPLING_RATE = 16
DOWNSAMPLING_RATIOS = (2, 2)


def latents_per_second() -> float:
    """The latent frame rate the pipeline derives from the tiny VAE's config."""
    return SAMPLING_RATE / math.prod(DOWNSAMPLING_RATIOS)


def duration_for(frames: int) -> float:
    """The `audio_duration` (seconds) that gives exactly `frames` latent frames (the pipeline takes the ceiling)."""
    return frames / latents_per_second()


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter from a seeded normal so that a wrong formula changes the output.

    RMSNorm weights are drawn around 1 (1 + 0.2 z), Linear/Conv weights with std 1/sqrt(fan_in) (activations stay
    O(1) through the stack), biases with std 0.1, token embeddings and learned vectors (null condition, timbre
    special token) with std 1, and the adaLN tables with std 0.5: real tables are close to 1/sqrt(D), which would
    leave the modulation nearly inert in a model this small.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                z = torch.randn(p.shape, generator=g, dtype=torch.float32)
                if type(sub).__name__.endswith("RMSNorm"):
                    value = 1.0 + 0.2 * z
                elif name == "bias":
                    value = 0.1 * z
                elif isinstance(sub, torch.nn.ConvTranspose1d):
                    # Weight (in, out, k): each output sample sums in * k / stride products.
                    value = z * (p.shape[0] * p.shape[2] / sub.stride[0]) ** -0.5
                elif isinstance(sub, (torch.nn.Linear, torch.nn.Conv1d)):
                    value = z * p[0].numel() ** -0.5
                elif name == "scale_shift_table":
                    value = 0.5 * z
                else:
                    value = z
                p.copy_(value.to(p.dtype))
    return module


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE `PreTrainedTokenizerFast`, trained in memory, standing in for Qwen3-Embedding's tokenizer.

    What `AceStepPipeline.encode_prompt` relies on, matched here: `<|endoftext|>` (which the prompt and lyric
    templates contain) is one special token; it is also the pad token, as in Qwen's tokenizer; padding is on the
    right; no BOS/EOS is added. Byte-level pre-tokenisation means any string encodes (no unknown token). The merges
    are learned from the pipeline's own templates, so typical prompts take a few dozen tokens, not one per byte.
    """
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from diffusers.pipelines.ace_step.pipeline_ace_step import SFT_GEN_PROMPT, TASK_INSTRUCTIONS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    metas = "- bpm: N/A\n- timesignature: N/A\n- keyscale: N/A\n- duration: 30 seconds\n"
    corpus = [SFT_GEN_PROMPT.format(instruction, "A calm piano piece with soft strings", metas)
              for instruction in TASK_INSTRUCTIONS.values()]
    corpus += ["# Languages\nen\n\n# Lyric\n[verse]\nSoft notes in the morning light\n[chorus]\nMusic fills the air"
               + END_OF_TEXT, "Energetic rock with electric guitar, drums and bass, 120 bpm, C major"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
                                   padding_side="right")


def tiny_text_encoder(vocab_size: int, hidden: int = TEXT_HIDDEN, seed: int = 1):
    """A random 2-layer `transformers.Qwen3Model` (the architecture of Qwen3-Embedding-0.6B), fp32, eval mode.

    The pipeline calls it twice: the full model on the prompt ids (`last_hidden_state`, no attention mask, so
    causal attention keeps right padding from reaching the valid tokens), and only `get_input_embeddings()` on the
    lyric ids. `vocab_size` must cover the tokenizer (`len(tokenizer)`).
    """
    pytest.importorskip("transformers")
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                         max_position_embeddings=512, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3Model(config)
    return _randomize(model, seed).eval()


def tiny_condition_encoder(text_hidden_dim: int = TEXT_HIDDEN, hidden_size: int = 64, timbre_hidden_dim: int = 8,
                           silence_frames: int = 160, seed: int = 2):
    """A random `AceStepConditionEncoder` (lyric encoder, timbre encoder, text projector), 2 + 2 layers, fp32.

    `text_hidden_dim` is the text encoder's width; `hidden_size` is the width of the packed condition it returns,
    which must be the DiT's `encoder_hidden_size`. `timbre_hidden_dim` must equal the DiT's latent width: the
    pipeline uses `silence_latent` both as the timbre input (its first ceil(30 s * latents_per_second) frames,
    120 here) and as the source latents of the context. `silence_latent` (1, silence_frames, timbre_hidden_dim) and
    `null_condition_emb` (1, 1, hidden_size) are random, so that neither reads as zero.
    """
    pytest.importorskip("transformers")
    from diffusers.pipelines.ace_step import AceStepConditionEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = AceStepConditionEncoder(
            hidden_size=hidden_size, intermediate_size=2 * hidden_size, text_hidden_dim=text_hidden_dim,
            timbre_hidden_dim=timbre_hidden_dim, num_lyric_encoder_hidden_layers=2,
            num_timbre_encoder_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            rope_theta=10000.0, sliding_window=8)
    _randomize(encoder, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    encoder.silence_latent = torch.randn(1, silence_frames, timbre_hidden_dim, generator=g)
    return encoder.eval()


def tiny_vae(latent_channels: int = 8, seed: int = 3):
    """A random `AutoencoderOobleck` at 16 Hz with downsampling (2, 2): hop 4, so 4 latent frames per second.

    The decoder reads `latent_channels` (the DiT's `audio_acoustic_hidden_dim`) and writes stereo audio of
    4 * T samples; the encoder width is 2 * latent_channels (mean and scale), so encoding is consistent too.
    """
    diffusers = pytest.importorskip("diffusers")
    # diffusers' Oobleck blocks still call the deprecated torch.nn.utils.weight_norm; that is not ours to fix.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weight_norm.*is deprecated", category=FutureWarning)
        torch.manual_seed(seed)
        vae = diffusers.AutoencoderOobleck(
            encoder_hidden_size=2 * latent_channels, downsampling_ratios=list(DOWNSAMPLING_RATIOS),
            channel_multiples=[1, 2], decoder_channels=4, decoder_input_channels=latent_channels, audio_channels=2,
            sampling_rate=SAMPLING_RATE)
    return vae.eval()


def tiny_transformer(turbo: bool, head_dim: int = 16, seed: int = 0, **overrides):
    """A random `AceStepTransformer1DModel`: hidden 64, SwiGLU 96, 2 layers (sliding, full), 4 q / 2 kv heads,
    latent width 8, patch 2, window 4, fp32, eval mode. `is_turbo=turbo` selects the pipeline's turbo path
    (no CFG) or the base path (APG on the learned null condition).

    `in_channels` defaults to 3 * audio_acoustic_hidden_dim (context = silence latents + chunk mask, then x).
    Any config key can be overridden, e.g. `encoder_hidden_size=48` for the XL layout.
    """
    diffusers = pytest.importorskip("diffusers")
    config = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=head_dim, audio_acoustic_hidden_dim=8, patch_size=2,
                  sliding_window=4, is_turbo=turbo)
    config.update(overrides)
    config.setdefault("in_channels", 3 * config["audio_acoustic_hidden_dim"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = diffusers.AceStepTransformer1DModel(**config)
    return _randomize(model, seed).eval()


def tiny_ace_step_pipeline(turbo: bool = True, seed: int = 0, **transformer_overrides):
    """A diffusers `AceStepPipeline` on CPU in fp32 with the tiny components above, progress bar off.

    The scheduler is `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)`, the real pipeline's
    config: the pipeline computes its shifted sigmas itself and passes them through `set_timesteps(sigmas=...)`.
    Each component gets its own seed derived from `seed`; `transformer_overrides` go to `tiny_transformer`, and
    the condition encoder and VAE follow the DiT's `encoder_hidden_size` and latent width.
    """
    diffusers = pytest.importorskip("diffusers")
    transformer = tiny_transformer(turbo, seed=seed, **transformer_overrides)
    cfg = transformer.config
    tokenizer = tiny_tokenizer()
    pipe = diffusers.AceStepPipeline(
        vae=tiny_vae(cfg.audio_acoustic_hidden_dim, seed=seed + 3),
        text_encoder=tiny_text_encoder(len(tokenizer), seed=seed + 1),
        tokenizer=tokenizer,
        transformer=transformer,
        condition_encoder=tiny_condition_encoder(hidden_size=cfg.encoder_hidden_size or cfg.hidden_size,
                                                 timbre_hidden_dim=cfg.audio_acoustic_hidden_dim, seed=seed + 2),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe
