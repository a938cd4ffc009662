"""Stock pipelines of the coverage families with Llama / Qwen2.5-VL + CLIP or ByT5 text encoders (the Hunyuan
families) and others, from tiny components (see stock_pipelines.py)."""

from __future__ import annotations

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from stock_pipelines import StockCase


def _tiny_hunyuan_video_vae() -> diffusers.AutoencoderKLHunyuanVideo:
    """HunyuanVideo's causal video VAE at diffusers' test size: four stages of 8 channels, 8x in space, 4x in time."""
    torch.manual_seed(3)
    return diffusers.AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True).eval()


def _tiny_hunyuan_text_encoders():
    """HunyuanVideo's two text encoders, tiny: a two-layer Llama (16 wide; the pipeline reads the hidden states two
    layers before the last) over a word tokenizer, and a one-layer CLIP (pooled 8) over a CLIP word tokenizer. The
    stock prompt template tokenizes to more than its `crop_start` of 95 tokens here, so the crop keeps the prompt."""
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    from cachekit.zoo._text import build_word_tokenizer
    from tiny_models import _tiny_clip_tokenizer

    tokenizer = build_word_tokenizer(["<pad>", "<bos>", "<eos>", "<unk>"], eos="<eos>", pad="<pad>", unk="<unk>",
                                     bos="<bos>", model_max_length=256)
    torch.manual_seed(1)
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    tokenizer_2 = _tiny_clip_tokenizer(model_max_length=77)  # the pipeline pads CLIP prompts to 77
    torch.manual_seed(2)
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer_2), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, pad_token_id=tokenizer_2.pad_token_id,
        bos_token_id=tokenizer_2.bos_token_id, eos_token_id=tokenizer_2.eos_token_id)).eval()
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2)


def tiny_hunyuan_video_pipeline():
    """A stock HunyuanVideoPipeline (text to video) from tiny configs: Llama + CLIP text encoders over word tokenizers
    (`_tiny_hunyuan_text_encoders`), a one-double- one-single-block HunyuanVideo transformer with a distilled guidance
    embedding, HunyuanVideo's causal VAE (1 frame of 16x16 px -> 1 x 2 x 2 latents), flow-matching Euler. Its true
    CFG (`true_cfg_scale` > 1 and a negative prompt) is two transformer calls per step, named by
    `cache_context("cond")` / `("uncond")`."""
    torch.manual_seed(0)
    transformer = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)).eval()
    pipe = diffusers.HunyuanVideoPipeline(transformer=transformer, vae=_tiny_hunyuan_video_vae(),
                                          scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                          **_tiny_hunyuan_text_encoders())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_hunyuan_video_framepack_pipeline():
    """A stock HunyuanVideoFramepackPipeline (image to video) from tiny configs: HunyuanVideo's Llama + CLIP text
    encoders (`_tiny_hunyuan_text_encoders`), a one-layer SigLIP vision encoder (32 wide, 16 px images in 8 px
    patches) with its image processor, a one-double- one-single-block Framepack transformer (image projection, clean
    latent embedders, guidance embedding), HunyuanVideo's causal VAE; 5 frames of 32x32 px in one section of a
    two-latent-frame window (2 x 4 x 4 latents). Its true CFG is two unnamed transformer calls per step (conditional,
    then negative)."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(4)
    image_encoder = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=16,
        patch_size=8)).eval()
    feature_extractor = SiglipImageProcessor(size={"height": 16, "width": 16})
    torch.manual_seed(0)
    transformer = diffusers.HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None,
        has_image_proj=True, image_proj_dim=32, has_clean_x_embedder=True).eval()
    pipe = diffusers.HunyuanVideoFramepackPipeline(
        transformer=transformer, vae=_tiny_hunyuan_video_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        image_encoder=image_encoder, feature_extractor=feature_extractor, **_tiny_hunyuan_text_encoders())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _framepack_image():
    """A 32x32 RGB gradient: the image the Framepack case animates."""
    from PIL import Image

    ramp = torch.linspace(0, 255, 32).to(torch.uint8)
    across, down = ramp[None, :].expand(32, 32), ramp[:, None].expand(32, 32)
    return Image.fromarray(torch.stack([across, down, across.flip(1)], -1).numpy())


def tiny_easyanimate_pipeline():
    """A stock EasyAnimatePipeline (text to video) from tiny configs: its BertModel text-encoder option (two layers,
    16 wide) over a word tokenizer with a one-line chat template (the pipeline formats every prompt as a chat
    message, and pads it to 256 tokens: its call takes no sequence length), a two-block EasyAnimate transformer, a
    four-stage Magvit video VAE (8x in space, 4x in time; 1 frame of 16x16 px -> 1 x 2 x 2 latents), flow-matching
    Euler. Its CFG is batched (negative rows first)."""
    from transformers import BertConfig, BertModel

    from cachekit.zoo._text import build_word_tokenizer

    tokenizer = build_word_tokenizer(["[PAD]", "[CLS]", "[SEP]", "[UNK]"], eos="[SEP]", pad="[PAD]", unk="[UNK]",
                                     bos="[CLS]", model_max_length=256)
    tokenizer.chat_template = ("{% for message in messages %}{% for part in message['content'] %}{{ part['text'] }}"
                               "{% endfor %}{% endfor %}")
    torch.manual_seed(1)
    text_encoder = BertModel(BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id), add_pooling_layer=False).eval()
    torch.manual_seed(0)
    transformer = diffusers.EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, mmdit_layers=2, num_layers=2, sample_width=8, sample_height=8, patch_size=2).eval()
    torch.manual_seed(3)
    vae = diffusers.AutoencoderKLMagvit(
        in_channels=3, out_channels=3, down_block_types=("SpatialDownBlock3D",) + ("SpatialTemporalDownBlock3D",) * 3,
        up_block_types=("SpatialUpBlock3D",) + ("SpatialTemporalUpBlock3D",) * 3, block_out_channels=(8, 8, 8, 8),
        latent_channels=4, layers_per_block=1, norm_num_groups=2, spatial_group_norm=False).eval()
    pipe = diffusers.EasyAnimatePipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                         transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_prx_pipeline():
    """A stock PRXPipeline from tiny configs: a one-layer T5Gemma encoder (16 wide) over a word tokenizer, a two-block
    PRX transformer on 8x8x4 latents (patch 2: 16 tokens), a two-stage VAE (with the shift factor the pipeline
    adds), flow-matching Euler. Its CFG is batched (negative rows first)."""
    from transformers.models.t5gemma.configuration_t5gemma import T5GemmaModuleConfig
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

    from cachekit.zoo._text import build_word_tokenizer
    from stock_pipelines import tiny_kl_vae

    tokenizer = build_word_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>"], eos="<eos>", pad="<pad>", unk="<unk>",
                                     bos="<bos>", model_max_length=16)
    encoder = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                   layer_types=["full_attention"], dropout_rate=0.0, attention_dropout=0.0, query_pre_attn_scalar=8,
                   pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(1)
    text_encoder = T5GemmaEncoder(T5GemmaModuleConfig(**encoder)).eval()
    torch.manual_seed(0)
    transformer = diffusers.PRXTransformer2DModel(
        in_channels=4, patch_size=2, context_in_dim=16, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=2,
        axes_dim=[8, 8]).eval()
    with torch.no_grad():  # its blocks' modulations start at zero (gates 0: every block the identity), so nothing
        for block in transformer.blocks:  # cached would change the output; give them small random weights
            block.modulation.lin.weight.normal_(std=0.1)
            block.modulation.lin.bias.normal_(std=0.1)
    pipe = diffusers.PRXPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                 text_encoder=text_encoder, tokenizer=tokenizer, vae=tiny_kl_vae(shift_factor=0.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


_QWEN_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|> {{ message['role'] }} {{ message['content'] }} "
                       "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def tiny_hunyuan_video15_pipeline():
    """A stock HunyuanVideo15Pipeline (text to video) from tiny configs: a two-layer Qwen2.5-VL text model (16 wide)
    over a word tokenizer with a Qwen-style chat template, a one-layer T5 encoder in ByT5's slot (it only runs on
    quoted glyph text; a prompt without quotes gets zeros), a two-block HunyuanVideo-1.5 transformer, HunyuanVideo-
    1.5's two-stage VAE (4x in space, 2x in time: 1 frame of 16x16 px -> 1 x 4 x 4 latents), flow-matching Euler and
    a ClassifierFreeGuidance guider at scale 3. The pipeline's prompt lengths (1000 Qwen tokens, 256 ByT5 tokens),
    its 729 zero image tokens and its template crop (108 Qwen tokens) are plain attributes, set to 16, 16, 4 and the
    word tokenizer's length of the system turn here. Its CFG is the guider's: two transformer calls per step, named by
    `cache_context("pred_cond")` / `("pred_uncond")`; it is set on the guider (`guider.guidance_scale`), not by a
    call argument, and the call takes no step callback."""
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    from cachekit.zoo._text import build_word_tokenizer
    from tiny_models import _tiny_t5

    tokenizer = build_word_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"], eos="<|im_end|>",
                                     pad="<|endoftext|>", unk="<unk>", model_max_length=512)
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    torch.manual_seed(1)
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=1000000.0,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        pad_token_id=tokenizer.pad_token_id)).eval()
    tokenizer_2, text_encoder_2 = _tiny_t5(16, d_model=8, d_ff=16, num_layers=1, num_heads=2, seed=2)
    torch.manual_seed(0)
    transformer = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v").eval()
    torch.manual_seed(3)
    vae = diffusers.AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        spatial_compression_ratio=4, temporal_compression_ratio=2, downsample_match_channel=False,
        upsample_match_channel=False).eval()
    pipe = diffusers.HunyuanVideo15Pipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=3.0))
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length, pipe.vision_num_semantic_tokens = 16, 16, 4
    # the crop: what precedes the user's words in the chat (100 word tokens here, 108 Qwen tokens in the checkpoint)
    chat = tokenizer.apply_chat_template([[{"role": "system", "content": pipe.system_message},
                                           {"role": "user", "content": "seven"}]], tokenize=True, return_dict=True)
    pipe.prompt_template_encode_start_idx = chat["input_ids"][0].index(tokenizer.convert_tokens_to_ids("seven"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_motif_video_pipeline():
    """A stock MotifVideoPipeline (text to video) from tiny configs: a one-layer T5Gemma2 encoder (16 wide) over a
    word tokenizer, a one-double- one-single-block Motif-Video transformer (latents, zero condition and mask
    concatenated: 4 + 4 + 1 channels in), Wan's two-stage VAE (1 frame of 16x16 px -> 1 x 4 x 4 latents),
    flow-matching Euler and a ClassifierFreeGuidance guider at scale 3. Its CFG is the guider's: two transformer calls
    per step, named by `cache_context("pred_cond")` / `("pred_uncond")`; it is set on the guider
    (`guider.guidance_scale`), not by a call argument."""
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import SiglipVisionConfig, T5Gemma2Encoder, T5Gemma2EncoderConfig, T5Gemma2TextConfig

    from cachekit.zoo._text import build_word_tokenizer
    from stock_pipelines import tiny_wan_vae

    tokenizer = build_word_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>"], eos="<eos>", pad="<pad>", unk="<unk>",
                                     bos="<bos>", model_max_length=16)
    text_config = T5Gemma2TextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text_config.dropout_rate = 0.0
    torch.manual_seed(1)
    # (its vision tower, unused for text, would default to a full-size SigLIP: 4 s to initialise)
    vision_config = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=16, patch_size=8)
    text_encoder = T5Gemma2Encoder(T5Gemma2EncoderConfig(text_config=text_config, vision_config=vision_config,
                                                         mm_tokens_per_image=4)).eval()
    torch.manual_seed(0)
    transformer = diffusers.MotifVideoTransformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        mlp_ratio=2.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm", text_embed_dim=16,
        rope_axes_dim=(2, 2, 4)).eval()
    pipe = diffusers.MotifVideoPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), vae=tiny_wan_vae(),
                                        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                                        guider=ClassifierFreeGuidance(guidance_scale=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


_TRUE_CFG = {"true_cfg_scale": 3.0, "negative_prompt": "blurry"}

CASES: list[StockCase] = [
    StockCase("HunyuanVideo", tiny_hunyuan_video_pipeline, "two calls",
              {"height": 16, "width": 16, "num_frames": 1, "max_sequence_length": 16, "guidance_scale": 4.5},
              cfg=_TRUE_CFG, no_cfg={"true_cfg_scale": 1.0}, output="frames"),
    StockCase("HunyuanVideo-Framepack", tiny_hunyuan_video_framepack_pipeline, "two calls",
              {"height": 32, "width": 32, "num_frames": 5, "latent_window_size": 2, "max_sequence_length": 16,
               "guidance_scale": 4.5},
              inputs={"prompt": "a seven", "image": _framepack_image()}, cfg=_TRUE_CFG, no_cfg={"true_cfg_scale": 1.0},
              output="frames"),
    StockCase("EasyAnimate", tiny_easyanimate_pipeline, "batched", {"height": 16, "width": 16, "num_frames": 1},
              output="frames"),
    StockCase("PRX", tiny_prx_pipeline, "batched",
              {"height": 16, "width": 16, "use_resolution_binning": False, "tokenizer_max_length": 16}),
    StockCase("HunyuanVideo-1.5", tiny_hunyuan_video15_pipeline, "two calls",
              {"height": 16, "width": 16, "num_frames": 1}, cfg={"negative_prompt": "blurry"}, no_cfg={},
              output="frames", step_callback=None, guider_scales=(3.0, 1.0)),
    StockCase("Motif-Video", tiny_motif_video_pipeline, "two calls", {"height": 16, "width": 16, "num_frames": 1},
              cfg={"negative_prompt": "blurry"}, no_cfg={}, output="frames", guider_scales=(3.0, 1.0)),
]
