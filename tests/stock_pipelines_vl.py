"""Stock pipelines of the coverage families with vision-language encoders, image inputs or modular pipelines, from
tiny components (see stock_pipelines.py)."""

from __future__ import annotations

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from stock_pipelines import StockCase, tiny_byt5, tiny_kl_vae
from stock_pipelines_qwen import _qwen_tokenizer, _tiny_qwen_vae
from stock_pipelines_t5 import tiny_cogvideox_pipeline

# A ChatML template whose message content is a string or a list of parts (Qwen-VL's {"type": "text" | "image"}),
# as the Qwen-VL processors' chat templates take it: an image part becomes the vision tokens the processor expands.
_CHATML_VL = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
              "{% else %}{% for part in m['content'] %}{% if part['type'] == 'image' %}"
              "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
              "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _qwen_vl_tokenizer():
    """Qwen's word tokenizer (`_qwen_tokenizer`) with Qwen-VL's vision words as special tokens of their own: the
    Qwen-VL processors count image tokens by id, which must not be the unknown word's."""
    tokenizer = _qwen_tokenizer()
    tokenizer.add_tokens(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], special_tokens=True)
    return tokenizer


def _qwen3_vl_processor(tokenizer):
    """A Qwen3VLProcessor built in code: Qwen2-VL's image processor with Qwen3-VL's 16 px patches, resizing every
    image to at most 64x64 px (4x4 patches, 2x2-merged to 4 image tokens), Qwen3-VL's video processor, `tokenizer`
    and the `_CHATML_VL` template."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(patch_size=16, size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64})
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(), chat_template=_CHATML_VL)


def _tiny_qwen3_vl(tokenizer, num_layers: int = 2):
    """A Qwen3-VL (text and vision) 16 wide over `tokenizer`, with a one-block vision tower (16 px patches, 2x2
    merged) and no deepstack layers."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(1)
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": num_layers,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "vocab_size": len(tokenizer),
                     "max_position_embeddings": 512, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
                       "deepstack_visual_indexes": []},
        vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"))).eval()


def _tiny_image(size: int = 16) -> Image.Image:
    """A small fixed RGB picture (a colour gradient) for the image-conditioned pipelines."""
    ramp = torch.linspace(0, 255, size).to(torch.uint8)
    pixels = torch.stack([ramp.expand(size, size), ramp.expand(size, size).T, torch.full((size, size), 128,
                                                                                           dtype=torch.uint8)], -1)
    return Image.fromarray(pixels.numpy())


def tiny_consisid_pipeline():
    """A stock ConsisIDPipeline (identity-preserving image to video) from tiny configs: the CogVideoX case's one-layer
    T5 encoder and three-stage CogVideoX VAE (4x in space and time: 5 frames of 16x16 px -> 2 x 4 x 4 latents), a
    one-block ConsisID transformer on the noise and identity-image latents side by side (8 input channels), sincos
    positional embeddings, CogVideoX's DPM scheduler. Its face branch is off (`is_train_face=False`, the config
    default), so the call takes no face embeddings (`id_vit_hidden` and `id_cond`, which face models compute outside
    the pipeline, stay None) and the identity image reaches the transformer through its latents only. Its CFG is
    batched (both branches in one forward).

    `diffusers.ConsisIDPipeline` is a placeholder that raises without OpenCV; the pipeline module itself needs OpenCV
    only to draw face keypoints (`is_kps`, off here), so the class is imported from there."""
    from diffusers import CogVideoXDPMScheduler
    from diffusers.pipelines.consisid.pipeline_consisid import ConsisIDPipeline

    base = tiny_cogvideox_pipeline()
    torch.manual_seed(0)
    transformer = diffusers.ConsisIDTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=8, out_channels=4, time_embed_dim=2,
        text_embed_dim=16, num_layers=1, sample_width=4, sample_height=4, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16, is_train_face=False).eval()
    pipe = ConsisIDPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                            transformer=transformer, scheduler=CogVideoXDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_nucleusmoe_image_pipeline():
    """A stock NucleusMoEImagePipeline from tiny configs: a two-layer Qwen3-VL (its one-block vision tower unused:
    text only) over a word tokenizer, with its Qwen3VLProcessor built in code (the prompt embedding is the last
    hidden state, `return_index=-1`: the stock -8 wants eight layers), a two-block NucleusMoE transformer with dense
    MLPs (`moe_enabled=False`) on 8x8x4 latents (2x2-packed: 16 tokens), QwenImage's causal VAE, flow-matching
    Euler. Its CFG is two unnamed transformer calls per step (conditional, then negative)."""
    tokenizer = _qwen_vl_tokenizer()
    text_encoder = _tiny_qwen3_vl(tokenizer)
    torch.manual_seed(0)
    transformer = diffusers.NucleusMoEImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(16, 24, 24), moe_enabled=False).eval()
    pipe = diffusers.NucleusMoEImagePipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                             vae=_tiny_qwen_vae(), text_encoder=text_encoder,
                                             processor=_qwen3_vl_processor(tokenizer))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_joyimage_edit_pipeline():
    """A stock JoyImageEditPipeline (image edit) from tiny configs: a two-layer Qwen3-VL with a one-block vision
    tower over a word tokenizer (the prompt is encoded together with the reference image, which its Qwen3VLProcessor
    built in code shrinks to 4 image tokens), a two-block JoyImage-Edit transformer on the reference and target
    latents side by side (two items of 4 x 1 x 16 x 16, 2x2 patches: 128 tokens), Wan's VAE, flow-matching Euler.

    The pipeline snaps every size to one of its ~1-megapixel buckets (1024 x 1024 for a square image; no call
    argument or config goes lower), so its VAE is Wan's at its narrowest (one stage, two channels) behind Wan 2.2's
    patchify of 64 x 64 px patches: 1024 px -> 16 latents with no downsampling stage. Its CFG is two unnamed
    transformer calls per step (conditional, then negative)."""
    tokenizer = _qwen_vl_tokenizer()
    text_encoder = _tiny_qwen3_vl(tokenizer)
    torch.manual_seed(0)
    transformer = diffusers.JoyImageEditTransformer3DModel(
        patch_size=[1, 2, 2], in_channels=4, out_channels=4, hidden_size=32, num_attention_heads=2, text_dim=16,
        num_layers=2, rope_dim_list=[4, 6, 6]).eval()
    torch.manual_seed(3)
    vae = diffusers.AutoencoderKLWan(
        base_dim=2, z_dim=4, dim_mult=[1], num_res_blocks=1, temperal_downsample=[], latents_mean=[1000.0] * 4,
        latents_std=[1.0] * 4, patch_size=64, in_channels=3 * 64 * 64, out_channels=3 * 64 * 64,
        scale_factor_temporal=4, scale_factor_spatial=64).eval()
    # The pipeline samples the reference image's latents without its generator (`latent_dist.sample()`), from the
    # global RNG, so two stock calls differ. Make that sample exact: the encoder's posterior is moved to a mean of
    # about 1000 (`latents_mean` takes it back to unit scale, the post-quant conv's bias takes the decoder's input
    # back) with the least variance (log-variance -100, clamped to -30: a spread far below the mean's float32 ulp).
    with torch.no_grad():
        vae.quant_conv.weight[4:] = 0.0
        vae.quant_conv.bias[:4] += 1000.0
        vae.quant_conv.bias[4:] = -100.0
        vae.post_quant_conv.bias -= vae.post_quant_conv.weight.flatten(1).sum(1) * 1000.0
    pipe = diffusers.JoyImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                                          processor=_qwen3_vl_processor(tokenizer))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_glm_image_pipeline():
    """A stock GlmImagePipeline (text to image) from tiny configs, its autoregressive prior left out: a one-layer T5
    encoder over the byte-level ByT5 tokenizer for the quoted glyph text (the prompt's text between quotes: the
    case's prompt quotes a word; the negative is always the empty glyph text), a two-block GLM-Image transformer on
    8x8x4 latents (2x2 patches: 16 tokens) over a 16-entry prior codebook, a two-stage VAE, flow-matching Euler.

    The prior (`vision_language_encoder`, a GlmImageForConditionalGeneration, with its GlmImageProcessor) generates
    the transformer's `prior_token_ids` autoregressively; its processor asks for a 16 x 16 preview grid whatever the
    size, so 258 generated tokens a call. The case passes `prior_token_ids` instead (as the call allows, a prior run
    outside the pipeline), so prior and processor are None. Its CFG is two unnamed transformer calls per step
    (conditional, then the prior tokens dropped and the empty glyph text); guidance is on for `guidance_scale > 1`."""
    tokenizer, text_encoder = tiny_byt5(seed=2)
    torch.manual_seed(0)
    transformer = diffusers.GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=8, condition_dim=2, prior_vq_quantizer_codebook_size=16).eval()
    vae = tiny_kl_vae(4, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = diffusers.GlmImagePipeline(tokenizer=tokenizer, processor=None, text_encoder=text_encoder,
                                      vision_language_encoder=None, vae=vae, transformer=transformer,
                                      scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux3_modular_pipeline():
    """A stock Flux3ModularPipeline (FLUX.3 has no classic pipeline) assembled from `Flux3AutoBlocks` without its
    prompt-upsampler step (a Qwen3.5 model that rewrites the prompt by generation), from tiny components: a two-layer
    Qwen3-VL over a word tokenizer with its Qwen3VLProcessor built in code (layers 1 and 2 stacked,
    `text_encoder_out_layers=(1, 2)`: 32 wide), a one-double- two-single-block FLUX.3 transformer on 64 packed
    tokens, FLUX.2's one-stage VAE, flow-matching Euler, classifier-free guidance from the `guider` component. Its
    CFG is two unnamed transformer calls per step (conditional, then negative); it has no step callback. Guidance
    is the `guider` component's: a modular pipeline's call takes no argument that turns it off."""
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines.flux3 import Flux3AutoBlocks

    blocks = Flux3AutoBlocks()
    blocks.sub_blocks.pop("prompt_upsampler")
    # the pipeline's `set_progress_bar_config` reaches only its top-level steps, and the denoising loop is nested
    # deeper: quiet every step before `init_pipeline` copies them
    nested = [blocks]
    while nested:
        block = nested.pop()
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(disable=True)
        nested.extend(getattr(block, "sub_blocks", {}).values())
    pipe = blocks.init_pipeline()
    tokenizer = _qwen_vl_tokenizer()
    text_encoder = _tiny_qwen3_vl(tokenizer)
    torch.manual_seed(0)
    transformer = diffusers.Flux3Transformer2DModel(
        in_channels=4, cond_in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_channels=16, axes_dims_rope=(4, 4, 4, 4)).eval()
    torch.manual_seed(3)
    vae = diffusers.AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False).eval()
    pipe.update_components(text_encoder=text_encoder, tokenizer=_qwen3_vl_processor(tokenizer),
                           transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                           guider=ClassifierFreeGuidance(guidance_scale=3.0))
    return pipe


# How a call drives `tiny_flux3_modular_pipeline` (for a harness that can switch its guider off between calls).
FLUX3_CALL = {"height": 16, "width": 16, "text_encoder_out_layers": (1, 2), "max_sequence_length": 16}


CASES: list[StockCase] = [
    StockCase("ConsisID", tiny_consisid_pipeline, "batched",
              {"height": 16, "width": 16, "num_frames": 5, "max_sequence_length": 16},
              inputs={"prompt": "a seven", "image": _tiny_image()}, output="frames"),
    StockCase("NucleusMoE-Image", tiny_nucleusmoe_image_pipeline, "two calls",
              {"height": 16, "width": 16, "return_index": -1}),
    StockCase("JoyImage-Edit", tiny_joyimage_edit_pipeline, "two calls", {},
              inputs={"prompt": "a seven", "image": _tiny_image()}),
    StockCase("GLM-Image", tiny_glm_image_pipeline, "two calls", {"height": 16, "width": 16},
              inputs={"prompt": "a sign saying 'seven'", "prior_token_ids": torch.arange(16).view(1, 16)},
              cfg={"guidance_scale": 3.0}),
    StockCase("Flux3-modular", tiny_flux3_modular_pipeline, "two calls", FLUX3_CALL, cfg={"negative_prompt": "blurry"},
              no_cfg={}, step_callback=None, guider_scales=(3.0, 1.0)),
]
