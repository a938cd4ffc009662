"""Stock pipelines of the coverage families with a T5 (or BERT + mT5) text encoder, from tiny components (see
stock_pipelines.py)."""

from __future__ import annotations

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from stock_pipelines import StockCase, tiny_kl_vae
from tiny_models import _tiny_t5


def tiny_cogvideox_pipeline():
    """A stock CogVideoXPipeline (text to video) from tiny configs: a one-layer T5 encoder over a word tokenizer, a
    one-block CogVideoX transformer (sincos positional embeddings, 2x2 patches), a three-stage CogVideoX VAE
    compressing 4x in space and time (5 frames of 16x16 px -> 2 x 4 x 4 latents), CogVideoX's DDIM scheduler. Its CFG
    is batched (both branches in one forward, inside `cache_context("cond_uncond")`)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    tokenizer, text_encoder = _tiny_t5(16, d_model=16, d_ff=32, num_layers=1, num_heads=2, seed=1)
    torch.manual_seed(0)
    transformer = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=16, num_layers=1, sample_width=4, sample_height=4, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16).eval()
    torch.manual_seed(3)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4).eval()
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_allegro_pipeline():
    """A stock AllegroPipeline (text to video) from tiny configs: a one-layer T5 encoder over a word tokenizer, a
    two-block Allegro transformer (3D rotary embeddings, so a head size divisible by 3: 12; 2x2 patches), a
    three-stage Allegro VAE compressing 4x in space and time (8 frames of 16x16 px -> 2 x 4 x 4 latents), Euler
    ancestral (Allegro's own scheduler). Its CFG is batched. The Allegro VAE decodes only in tiles, of a fixed
    24 x 320 x 320 px by default (a zero video for anything smaller, and seconds per call at its smallest tile): its
    tile (`kernel`) and `stride` are set to the whole 8 x 16 x 16 px video, one tile, no blending."""
    from diffusers import AllegroPipeline, AutoencoderKLAllegro, EulerAncestralDiscreteScheduler

    tokenizer, text_encoder = _tiny_t5(16, d_model=16, d_ff=32, num_layers=1, num_heads=2, seed=1)
    torch.manual_seed(0)
    transformer = diffusers.AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=24, sample_width=4, sample_height=4, sample_frames=2, caption_channels=16).eval()
    torch.manual_seed(3)
    vae = AutoencoderKLAllegro(
        in_channels=3, out_channels=3, down_block_types=("AllegroDownBlock3D",) * 3,
        up_block_types=("AllegroUpBlock3D",) * 3, block_out_channels=(8, 8, 8),
        temporal_downsample_blocks=(True, True, False), temporal_upsample_blocks=(False, True, True),
        latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4, sample_size=16).eval()
    vae.enable_tiling()
    vae.kernel = vae.stride = (8, 16, 16)
    pipe = AllegroPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                           scheduler=EulerAncestralDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_cogview3plus_pipeline():
    """A stock CogView3PlusPipeline from tiny configs: a one-layer T5 encoder over a word tokenizer, a two-block
    CogView3-Plus transformer (size and crop micro-conditioning) on 8x8x4 latents, a two-stage VAE, CogVideoX's DDIM
    scheduler (CogView3-Plus's own). Its CFG is batched."""
    from diffusers import CogVideoXDDIMScheduler, CogView3PlusPipeline

    tokenizer, text_encoder = _tiny_t5(16, d_model=16, d_ff=32, num_layers=1, num_heads=2, seed=1)
    torch.manual_seed(0)
    transformer = diffusers.CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=16, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8).eval()
    pipe = CogView3PlusPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_kl_vae(),
                                transformer=transformer, scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_bria_pipeline():
    """A stock BriaPipeline from tiny configs: a one-layer T5 encoder over a word tokenizer, a one-double-
    one-single-block Bria transformer on 8x8x4 latents (16 packed tokens: the pipeline counts the VAE's stages as
    if each halved, so 16 px and a two-stage VAE give 8x8 latents), a two-stage VAE, flow-matching Euler on Bria's
    own sigmas. No image encoder or feature extractor (IP-Adapter parts). Its CFG is batched."""
    from diffusers import BriaPipeline

    tokenizer, text_encoder = _tiny_t5(16, d_model=16, d_ff=32, num_layers=1, num_heads=2, seed=1)
    torch.manual_seed(0)
    transformer = diffusers.BriaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=[0, 4, 4]).eval()
    pipe = BriaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_kl_vae(),
                        text_encoder=text_encoder, tokenizer=tokenizer, image_encoder=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_hunyuandit_pipeline():
    """A stock HunyuanDiTPipeline from tiny configs: a one-layer BertModel (16 wide) and a one-layer T5 encoder (in
    the place of mT5, 16 wide) over word tokenizers, a two-block HunyuanDiT transformer on 2x2x4 latents (patch 1:
    4 tokens; it predicts the variance as well), a four-stage VAE (8x: the pipeline sizes its rotary grid for an 8x
    VAE whatever the VAE), DDPM with v-prediction (HunyuanDiT's own). The pipeline pads the prompts to 77 BERT and
    256 T5 tokens, fixed, so the transformer's `text_len` and `text_len_t5` are those. No safety checker. Its CFG is
    batched (negative rows first)."""
    from diffusers import AutoencoderKL, DDPMScheduler, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel

    from cachekit.zoo._text import build_word_tokenizer

    tokenizer = build_word_tokenizer(["[PAD]", "[CLS]", "[SEP]", "[UNK]"], eos="[SEP]", pad="[PAD]", unk="[UNK]",
                                     bos="[CLS]", model_max_length=77)
    torch.manual_seed(2)
    text_encoder = BertModel(BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=77, pad_token_id=tokenizer.pad_token_id), add_pooling_layer=False).eval()
    tokenizer_2, text_encoder_2 = _tiny_t5(256, d_model=16, d_ff=32, num_layers=1, num_heads=2, seed=1)
    torch.manual_seed(0)
    transformer = diffusers.HunyuanDiT2DModel(
        sample_size=2, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=8, hidden_size=16, text_len=77,
        text_len_t5=256).eval()
    torch.manual_seed(3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16).eval()
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.018,
                              prediction_type="v_prediction", clip_sample=False, steps_offset=1)
    pipe = HunyuanDiTPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              scheduler=scheduler, safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES: list[StockCase] = [
    StockCase("CogVideoX", tiny_cogvideox_pipeline, "batched",
              {"height": 16, "width": 16, "num_frames": 5, "max_sequence_length": 16}, output="frames"),
    StockCase("Allegro", tiny_allegro_pipeline, "batched",
              {"height": 16, "width": 16, "num_frames": 8, "max_sequence_length": 16, "clean_caption": False},
              output="frames"),
    StockCase("CogView3-Plus", tiny_cogview3plus_pipeline, "batched",
              {"height": 16, "width": 16, "max_sequence_length": 16}),
    StockCase("Bria", tiny_bria_pipeline, "batched", {"height": 16, "width": 16, "max_sequence_length": 16}),
    StockCase("HunyuanDiT", tiny_hunyuandit_pipeline, "batched",
              {"height": 16, "width": 16, "use_resolution_binning": False}),
]
