"""Stock pipelines of the coverage families with a Qwen, GLM or other decoder-only language model as text encoder,
from tiny components (see stock_pipelines.py)."""

from __future__ import annotations

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from stock_pipelines import StockCase, tiny_byt5, tiny_kl_vae

# A ChatML template as Qwen's tokenizers carry (enough of it for `apply_chat_template` in the prompt encoders).
_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _qwen_tokenizer(model_max_length: int = 256):
    """A word tokenizer with Qwen's special words and a ChatML chat template. The prompt templates' other words are
    mostly unknown to it, which is all a template needs: enough tokens ahead of the prompt for the pipeline to drop."""
    from cachekit.zoo._text import build_word_tokenizer

    tokenizer = build_word_tokenizer(["<|endoftext|>", "<|im_end|>", "<unk>", "<|im_start|>"], eos="<|im_end|>",
                                     pad="<|endoftext|>", unk="<unk>", model_max_length=model_max_length)
    tokenizer.chat_template = _CHATML
    return tokenizer


def _qwen3_config(tokenizer, **config):
    """A one-layer Qwen3 text model, 16 wide, over `tokenizer`."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                       **config)


def _tiny_qwen2_5_vl(tokenizer, num_layers: int = 1):
    """A Qwen2.5-VL, 16 wide, over `tokenizer`, with a one-block vision tower (never used: text only)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(1)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": num_layers,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "max_position_embeddings": 512,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
                     "eos_token_id": tokenizer.eos_token_id},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id)).eval()


def _tiny_qwen_vae():
    """QwenImage's causal 3-D VAE at its smallest (one 2x downsampling in space, none in time): 4 latent channels."""
    torch.manual_seed(3)
    return diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                            temperal_downsample=[False], latents_mean=[0.0] * 4,
                                            latents_std=[1.0] * 4).eval()


def tiny_qwenimage_pipeline():
    """A stock QwenImagePipeline from tiny configs: a one-layer Qwen2.5-VL (with a one-block vision tower it never
    uses) over a word tokenizer, a two-block QwenImage transformer on 8x8x4 latents (2x2-packed: 16 tokens), QwenImage's
    causal VAE, flow-matching Euler. Its CFG ("true CFG") is two transformer calls per step, named by
    `cache_context("cond")` and `cache_context("uncond")`."""
    tokenizer = _qwen_tokenizer()
    text_encoder = _tiny_qwen2_5_vl(tokenizer)
    torch.manual_seed(0)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4)).eval()
    pipe = diffusers.QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_qwen_vae(),
                                       text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_ovis_image_pipeline():
    """A stock OvisImagePipeline from tiny configs: a one-layer Qwen3 model over a word tokenizer with a chat
    template, a one-double- one-single-block Ovis-Image transformer on 8x8x4 latents (16 packed tokens), a two-stage
    VAE with a shift, flow-matching Euler. Its CFG is two transformer calls per step, named by
    `cache_context("cond")` and `cache_context("uncond")`."""
    from transformers import Qwen3Model

    tokenizer = _qwen_tokenizer()
    torch.manual_seed(1)
    text_encoder = Qwen3Model(_qwen3_config(tokenizer)).eval()
    torch.manual_seed(0)
    transformer = diffusers.OvisImageTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 4, 8)).eval()
    vae = tiny_kl_vae(4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    pipe = diffusers.OvisImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                       text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux2_klein_pipeline():
    """A stock Flux2KleinPipeline from tiny configs: a one-layer Qwen3 causal LM over a word tokenizer with a chat
    template (its layer-1 hidden states are the prompt embedding, `text_encoder_out_layers=(1,)`), a one-double-
    one-single-block FLUX.2 transformer without guidance embedding on 16 packed tokens, FLUX.2's one-stage VAE (one
    latent channel, 2x2-patched to four), flow-matching Euler. Its CFG is two transformer calls per step, named by
    `cache_context("cond")` and `cache_context("uncond")`; the negative prompt is always empty."""
    from transformers import Qwen3ForCausalLM

    tokenizer = _qwen_tokenizer()
    torch.manual_seed(1)
    text_encoder = Qwen3ForCausalLM(_qwen3_config(tokenizer)).eval()
    torch.manual_seed(0)
    transformer = diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False).eval()
    torch.manual_seed(3)
    vae = diffusers.AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False).eval()
    pipe = diffusers.Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_cogview4_pipeline():
    """A stock CogView4Pipeline from tiny configs: a one-layer GLM model over a word tokenizer (its second-to-last
    hidden states, the embedding output, are the prompt embedding; the prompt is left-padded to 16 tokens), a
    two-block CogView4 transformer on 8x8x4 latents (2x2 patches: 16 tokens), a two-stage VAE, CogView4's linearly
    shifted flow-matching Euler. Its CFG is two transformer calls per step, named by `cache_context("cond")` and
    `cache_context("uncond")`."""
    from transformers import GlmConfig, GlmModel

    from cachekit.zoo._text import build_word_tokenizer

    tokenizer = build_word_tokenizer(["<pad>", "<eos>", "<unk>"], eos="<eos>", pad="<pad>", unk="<unk>",
                                     model_max_length=64)
    torch.manual_seed(1)
    text_encoder = GlmModel(GlmConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id)).eval()
    torch.manual_seed(0)
    transformer = diffusers.CogView4Transformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=16, time_embed_dim=8, condition_dim=2, rope_axes_dim=(4, 4)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                use_dynamic_shifting=True, time_shift_type="linear")
    pipe = diffusers.CogView4Pipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_kl_vae(4),
                                      transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_krea2_pipeline():
    """A stock Krea2Pipeline from tiny configs: a one-layer Qwen3-VL model (with a one-block vision tower it never
    uses) over a word tokenizer, its embedding and layer-1 hidden states tapped (`text_encoder_select_layers`), a
    two-block Krea 2 transformer on 8x8x4 latents (2x2-packed: 16 tokens), QwenImage's causal VAE, dynamically
    shifted flow-matching Euler. Its CFG (on for any `guidance_scale > 0`) is two unnamed transformer calls per step
    (conditional, then negative)."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    tokenizer = _qwen_tokenizer()
    torch.manual_seed(1)
    text_encoder = Qwen3VLModel(Qwen3VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 8, "vocab_size": len(tokenizer),
                     "max_position_embeddings": 512, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
                       "deepstack_visual_indexes": []},
        vocab_size=len(tokenizer))).eval()
    torch.manual_seed(0)
    transformer = diffusers.Krea2Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=2, text_num_attention_heads=2,
        text_num_key_value_heads=1, text_intermediate_size=16, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
        axes_dims_rope=(4, 2, 2)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=6400)
    pipe = diffusers.Krea2Pipeline(scheduler=scheduler, vae=_tiny_qwen_vae(), text_encoder=text_encoder,
                                   tokenizer=tokenizer, transformer=transformer, text_encoder_select_layers=(0, 1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_longcat_image_pipeline():
    """A stock LongCatImagePipeline from tiny configs: a one-layer Qwen2.5-VL over a word tokenizer (its processor,
    for the prompt rewrite the case turns off with `enable_prompt_rewrite=False`, built from Qwen2-VL's image and
    video processors and that tokenizer), a one-double- one-single-block LongCat-Image transformer on 8x8x16 latents
    (2x2-packed: 16 tokens; the pipeline fixes 16 latent channels), a two-stage VAE with a shift, flow-matching
    Euler. The prompt is padded to `tokenizer_max_length`, set to 16 here (512 stock). Its CFG is two transformer
    calls per step, named by `cache_context("cond")` and `cache_context("uncond")`; it has no step callback."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = _qwen_tokenizer()
    text_encoder = _tiny_qwen2_5_vl(tokenizer)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=_CHATML)
    torch.manual_seed(0)
    transformer = diffusers.LongCatImageTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[4, 4, 8]).eval()
    vae = tiny_kl_vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    pipe = diffusers.LongCatImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                          text_encoder=text_encoder, tokenizer=tokenizer, text_processor=processor,
                                          transformer=transformer)
    pipe.tokenizer_max_length = 16
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_hunyuanimage_pipeline():
    """A stock HunyuanImagePipeline (HunyuanImage 2.1) from tiny configs: a two-layer Qwen2.5-VL over a word
    tokenizer (the pipeline takes the hidden states two layers from the top, here the embedding output), a one-layer
    T5 over the byte-level ByT5 tokenizer for quoted glyph text, a one-double- one-single-block HunyuanImage
    transformer on 4x4x4 latents (16 tokens), a three-stage HunyuanImage VAE (4x; its group norms want 32 channels),
    flow-matching Euler with shift 7.
    The prompt is padded to `tokenizer_max_length` (16 here, 1000 stock) and the glyph embedding to
    `tokenizer_2_max_length` (8 here, 128 stock).

    Its CFG is the `guider` component's (adaptive projected guidance mixed with CFG): one transformer call per
    branch and step, named by `cache_context("pred_cond")` and `cache_context("pred_uncond")`. Guidance is not a call
    argument; a call routes to the `ocr_guider` instead when the glyph embedding is not all zeros, and that guider is
    disabled here, so a call given `prompt_embeds_2` runs without CFG (the case's `no_cfg`)."""
    tokenizer = _qwen_tokenizer()
    text_encoder = _tiny_qwen2_5_vl(tokenizer, num_layers=2)
    tokenizer_2, text_encoder_2 = tiny_byt5(seed=2)
    torch.manual_seed(0)
    transformer = diffusers.HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, text_embed_2_dim=16, rope_axes_dim=(4, 4)).eval()
    torch.manual_seed(3)
    vae = diffusers.AutoencoderKLHunyuanImage(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32), layers_per_block=1,
        scaling_factor=0.476986, spatial_compression_ratio=4, sample_size=16).eval()
    pipe = diffusers.HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
        guider=diffusers.AdaptiveProjectedMixGuidance(guidance_scale=3.0, adaptive_projected_guidance_start_step=2),
        ocr_guider=diffusers.AdaptiveProjectedMixGuidance(enabled=False))
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length = 16, 8
    pipe.set_progress_bar_config(disable=True)
    return pipe


_TRUE_CFG = {"true_cfg_scale": 3.0, "negative_prompt": "blurry"}

CASES: list[StockCase] = [
    StockCase("QwenImage", tiny_qwenimage_pipeline, "two calls", {"height": 16, "width": 16, "max_sequence_length": 16},
              cfg=_TRUE_CFG, no_cfg={"true_cfg_scale": 1.0}),
    StockCase("Ovis-Image", tiny_ovis_image_pipeline, "two calls",
              {"height": 16, "width": 16, "max_sequence_length": 16}),
    StockCase("Flux2-Klein", tiny_flux2_klein_pipeline, "two calls",
              {"height": 8, "width": 8, "max_sequence_length": 16, "text_encoder_out_layers": (1,)},
              cfg={"guidance_scale": 3.0}),
    StockCase("CogView4", tiny_cogview4_pipeline, "two calls", {"height": 16, "width": 16, "max_sequence_length": 16}),
    StockCase("Krea2", tiny_krea2_pipeline, "two calls", {"height": 16, "width": 16, "max_sequence_length": 16},
              no_cfg={"guidance_scale": 0.0}),
    StockCase("HunyuanImage", tiny_hunyuanimage_pipeline, "two calls", {"height": 16, "width": 16},
              cfg={"negative_prompt": "blurry"},  # the guider's CFG; a glyph embedding routes to the disabled OCR one
              no_cfg={"prompt_embeds_2": torch.ones(1, 8, 16),
                      "prompt_embeds_mask_2": torch.ones(1, 8, dtype=torch.long)}),
    StockCase("LongCat-Image", tiny_longcat_image_pipeline, "two calls",
              {"height": 16, "width": 16, "enable_prompt_rewrite": False}, step_callback=None),
]
