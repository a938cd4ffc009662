"""Stock pipelines of the coverage families with a UMT5 or Gemma2 text encoder and Wan's video VAE, from tiny
components (see stock_pipelines.py)."""

from __future__ import annotations

import diffusers
import torch

from stock_pipelines import StockCase, tiny_wan_vae
from tiny_models import _WAN, _tiny_gemma2


def _tiny_umt5(model_max_length: int = 16, d_model: int = 16):
    """A one-layer UMT5 encoder (what the Wan family takes as its text encoder) over a word tokenizer."""
    from transformers import UMT5Config, UMT5EncoderModel

    from cachekit.zoo._text import build_word_tokenizer

    tokenizer = build_word_tokenizer(["<pad>", "</s>", "<unk>"], eos="</s>", pad="<pad>", unk="<unk>",
                                     model_max_length=model_max_length)
    torch.manual_seed(1)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False)).eval()
    return tokenizer, text_encoder


def tiny_skyreels_v2_pipeline():
    """A stock SkyReelsV2Pipeline (text to video) from tiny configs: a one-layer UMT5 encoder over a word
    tokenizer, a two-block SkyReels-V2 transformer (the Wan-like coverage config), Wan's causal VAE at its smallest
    (1 frame of 16x16 px -> 1 x 4 x 4 latents; the pipeline wants multiples of 16), UniPC with flow sigmas. Its CFG
    is two transformer calls per step, named by `cache_context("cond")` / `("uncond")`."""
    from diffusers import SkyReelsV2Pipeline, UniPCMultistepScheduler

    tokenizer, text_encoder = _tiny_umt5()
    torch.manual_seed(0)
    transformer = diffusers.SkyReelsV2Transformer3DModel(**_WAN).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    pipe = SkyReelsV2Pipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                              vae=tiny_wan_vae(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_vace_pipeline():
    """A stock WanVACEPipeline, text to video (no control video: the pipeline conditions on an all-zero video under
    an all-ones mask) from tiny configs: a one-layer UMT5 encoder over a word tokenizer, a two-block Wan-VACE
    transformer with one VACE block (its control input is the zero video's inactive + reactive latents, 2 x 4
    channels, and the 4x4-folded mask, 16 channels), no `transformer_2`, Wan's causal VAE at its smallest (1 frame of
    16x16 px), flow-matching Euler. Its CFG is two transformer calls per step, named by `cache_context("cond")` /
    `("uncond")`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline

    tokenizer, text_encoder = _tiny_umt5()
    torch.manual_seed(0)
    transformer = diffusers.WanVACETransformer3DModel(**_WAN, vace_layers=[0], vace_in_channels=2 * 4 + 4 * 4).eval()
    pipe = WanVACEPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_wan_vae(),
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_helios_pipeline():
    """A stock HeliosPipeline (text to video) from tiny configs: a one-layer UMT5 encoder over a word tokenizer, a
    two-block Helios transformer with its multi-term memory patches (the pipeline always passes the short, mid and
    long history latents: zeros on the first chunk), Wan's causal VAE at its smallest, Helios' UniPC scheduler in
    one stage with dynamic shifting (the pipeline passes its sigmas and shift). One chunk of one latent frame
    (`num_latent_frames_per_chunk=1`, 1 frame of 16x16 px) with a 4 + 2 + 1 frame history. Its CFG is two
    transformer calls per step, named by `cache_context("cond")` / `("uncond")`."""
    from diffusers import HeliosPipeline, HeliosScheduler

    tokenizer, text_encoder = _tiny_umt5()
    torch.manual_seed(0)
    transformer = diffusers.HeliosTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, rope_dim=(4, 4, 4)).eval()
    pipe = HeliosPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_wan_vae(),
                          scheduler=HeliosScheduler(stage_range=[0, 1], stages=1, use_dynamic_shifting=True),
                          transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sana_video_pipeline():
    """A stock SanaVideoPipeline (text to video) from tiny configs: a one-layer Gemma2 text encoder over a word
    tokenizer, a two-block Sana-Video transformer, Wan's causal VAE at its smallest (1 frame of 32x32 px -> 1 x 8 x 8
    latents; the pipeline wants multiples of 32), Sana's flow DPM-Solver scheduler. Resolution binning is off (its
    bins are for the full-size models). Its CFG is batched (negative rows first)."""
    from diffusers import DPMSolverMultistepScheduler, SanaVideoPipeline

    tokenizer, text_encoder = _tiny_gemma2(seed=1)
    torch.manual_seed(0)
    transformer = diffusers.SanaVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32).eval()
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
    pipe = SanaVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_wan_vae(),
                             transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_chronoedit_pipeline():
    """A stock ChronoEditPipeline (image editing as image to video) from tiny configs: a one-layer UMT5 encoder over
    a word tokenizer, a two-layer CLIP vision encoder (8 wide, 16 px images in 8 px patches; the pipeline takes its
    second-to-last hidden states) with its image processor, a two-block ChronoEdit transformer (the Wan-like
    coverage config taking the noise, the first-frame mask over 4 frames and the image's latents: 4 + 4 + 4
    channels), Wan's causal VAE at its smallest (the pipeline fixes 5 frames without temporal reasoning: 16x16 px ->
    2 x 4 x 4 latents), flow-matching Euler. Its CFG is two unnamed transformer calls per step (conditional, then
    negative), both with the image embedding: the branches are told apart by call order."""
    from diffusers import ChronoEditPipeline, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    tokenizer, text_encoder = _tiny_umt5()
    torch.manual_seed(2)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        patch_size=8)).eval()
    torch.manual_seed(0)
    transformer = diffusers.ChronoEditTransformer3DModel(**{**_WAN, "in_channels": 12}, image_dim=8).eval()
    pipe = ChronoEditPipeline(tokenizer=tokenizer, text_encoder=text_encoder, image_encoder=image_encoder,
                              image_processor=CLIPImageProcessor(crop_size=16, size=16), transformer=transformer,
                              vae=tiny_wan_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_bria_fibo_pipeline():
    """A stock BriaFiboPipeline from tiny configs: a two-layer SmolLM3 causal LM over a word tokenizer as text
    encoder (the pipeline takes its last two hidden states, 2 x 16 wide, as the prompt embedding and every layer's
    hidden states for the transformer's blocks), a one-double- one-single-block FIBO transformer on unpatched 4-channel
    latents, a Wan VAE with four down-samplings (the pipeline fixes 16x: 32x32 px -> 2 x 2 latents, one frame), and
    flow-matching Euler with FLUX's dynamic shift. FIBO's prompts are JSON captions from its VLM, but the pipeline only
    tokenizes the string, so a plain prompt works. Its CFG is batched (negative rows first); prompt and negative are
    padded to the longer one under an attention mask."""
    from diffusers import AutoencoderKLWan, BriaFiboPipeline, FlowMatchEulerDiscreteScheduler
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    from cachekit.zoo._text import build_word_tokenizer

    tokenizer = build_word_tokenizer(["<pad>", "<bos>", "<eos>", "<unk>"], eos="<eos>", pad="<pad>", unk="<unk>",
                                     bos="<bos>", model_max_length=64)
    torch.manual_seed(1)
    text_encoder = SmolLM3ForCausalLM(SmolLM3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    torch.manual_seed(0)
    transformer = diffusers.BriaFiboTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, text_encoder_dim=16, axes_dims_rope=[0, 4, 4]).eval()
    torch.manual_seed(3)
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, False, True, True], latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4, scale_factor_spatial=16).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = BriaFiboPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                            tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_image(size: int = 16):
    """A small RGB gradient as a PIL image: the input of the image-conditioned cases."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    return Image.fromarray(np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                                     np.full((size, size), 128, np.uint8)], axis=-1))


_VIDEO = {"height": 16, "width": 16, "num_frames": 1, "max_sequence_length": 16}

CASES: list[StockCase] = [
    StockCase("SkyReels-V2", tiny_skyreels_v2_pipeline, "two calls", _VIDEO, output="frames"),
    StockCase("Wan-VACE", tiny_wan_vace_pipeline, "two calls", _VIDEO, output="frames"),
    StockCase("Helios", tiny_helios_pipeline, "two calls",
              {**_VIDEO, "num_latent_frames_per_chunk": 1, "history_sizes": [4, 2, 1]}, output="frames"),
    StockCase("Sana-Video", tiny_sana_video_pipeline, "batched",
              {"height": 32, "width": 32, "frames": 1, "max_sequence_length": 16, "use_resolution_binning": False},
              output="frames"),
    StockCase("ChronoEdit", tiny_chronoedit_pipeline, "two calls",
              {"height": 16, "width": 16, "max_sequence_length": 16},
              inputs={"image": _tiny_image(), "prompt": "a seven"}, output="frames"),
    StockCase("BriaFibo", tiny_bria_fibo_pipeline, "batched", {"height": 32, "width": 32, "max_sequence_length": 16}),
]
