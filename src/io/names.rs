//! Tensor names in the two released layouts: the model asks for every tensor by its HF-native name, and
//! Microsoft's original layout stores it under another ([`original_name`], and back: [`hf_name`]).

/// Name of the LM head bias that only Microsoft's layout has (BART's `final_logits_bias`).
pub const FINAL_LOGITS_BIAS: &str = "final_logits_bias";

/// Maps an HF-native tensor name to Microsoft's original one (the inverse of transformers'
/// `convert_florence2_original_pytorch_to_hf.py` renames).
pub fn original_name(hf: &str) -> String {
    if let Some(rest) = hf.strip_prefix("model.vision_tower.") {
        // Order matters: the norm renames produce `window_attn.norm.`, which no later rule touches.
        const RULES: [(&str, &str); 12] = [
            (".conv.", ".proj."),
            ("_block.conv1.", "_block.conv1.fn.dw."),
            ("_block.conv2.", "_block.conv2.fn.dw."),
            ("spatial_block.norm1.", "spatial_block.window_attn.norm."),
            ("window_attn.qkv.", "window_attn.fn.qkv."),
            ("window_attn.proj.", "window_attn.fn.proj."),
            ("channel_block.norm1.", "channel_block.channel_attn.norm."),
            ("channel_attn.qkv.", "channel_attn.fn.qkv."),
            ("channel_attn.proj.", "channel_attn.fn.proj."),
            ("_block.norm2.", "_block.ffn.norm."),
            ("ffn.fc1.", "ffn.fn.net.fc1."),
            ("ffn.fc2.", "ffn.fn.net.fc2."),
        ];
        let mut name = format!("vision_tower.{rest}");
        for (from, to) in RULES {
            name = name.replace(from, to);
        }
        return name;
    }
    if let Some(rest) = hf.strip_prefix("model.multi_modal_projector.") {
        return match rest {
            "image_projection.weight" => "image_projection".into(),
            _ => rest.replace("image_position_embed.", "image_pos_embed."),
        };
    }
    if let Some(rest) = hf.strip_prefix("model.language_model.") {
        return format!("language_model.model.{rest}");
    }
    match hf {
        "lm_head.weight" => "language_model.lm_head.weight".into(),
        FINAL_LOGITS_BIAS => "language_model.final_logits_bias".into(),
        other => other.into(),
    }
}

/// The HF-native name of a tensor name of Microsoft's layout: the inverse of [`original_name`], checked by
/// mapping back; `None` for a name [`original_name`] does not produce.
pub fn hf_name(original: &str) -> Option<String> {
    let candidate = if let Some(rest) = original.strip_prefix("vision_tower.") {
        // The renames of `original_name` undone in reverse order; `.conv.` became `.proj.` in the patch
        // embeddings (`convs.N`) only, the one rename whose result other names contain too.
        const RULES: [(&str, &str); 11] = [
            ("ffn.fn.net.fc2.", "ffn.fc2."),
            ("ffn.fn.net.fc1.", "ffn.fc1."),
            ("_block.ffn.norm.", "_block.norm2."),
            ("channel_attn.fn.proj.", "channel_attn.proj."),
            ("channel_attn.fn.qkv.", "channel_attn.qkv."),
            ("channel_block.channel_attn.norm.", "channel_block.norm1."),
            ("window_attn.fn.proj.", "window_attn.proj."),
            ("window_attn.fn.qkv.", "window_attn.qkv."),
            ("spatial_block.window_attn.norm.", "spatial_block.norm1."),
            ("_block.conv2.fn.dw.", "_block.conv2."),
            ("_block.conv1.fn.dw.", "_block.conv1."),
        ];
        let mut name = rest.to_owned();
        if name.starts_with("convs.") {
            name = name.replacen(".proj.", ".conv.", 1);
        }
        for (from, to) in RULES {
            name = name.replace(from, to);
        }
        format!("model.vision_tower.{name}")
    } else if original == "image_projection" {
        "model.multi_modal_projector.image_projection.weight".into()
    } else if let Some(rest) = original.strip_prefix("image_pos_embed.") {
        format!("model.multi_modal_projector.image_position_embed.{rest}")
    } else if original.starts_with("visual_temporal_embed.")
        || original.starts_with("image_proj_norm.")
    {
        format!("model.multi_modal_projector.{original}")
    } else if let Some(rest) = original.strip_prefix("language_model.model.") {
        format!("model.language_model.{rest}")
    } else if original == "language_model.lm_head.weight" {
        "lm_head.weight".into()
    } else if original == "language_model.final_logits_bias" {
        FINAL_LOGITS_BIAS.into()
    } else {
        return None;
    };
    (original_name(&candidate) == original).then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::{hf_name, original_name};

    #[test]
    fn renames_match_the_release_key_list() {
        // Pairs from ../shared/florence2-release-files/keys/Florence-2-large_hf_native_keys_DERIVED.txt.
        let pairs = [
            (
                "model.vision_tower.convs.0.conv.weight",
                "vision_tower.convs.0.proj.weight",
            ),
            (
                "model.vision_tower.convs.3.norm.bias",
                "vision_tower.convs.3.norm.bias",
            ),
            (
                "model.vision_tower.blocks.0.0.spatial_block.conv1.weight",
                "vision_tower.blocks.0.0.spatial_block.conv1.fn.dw.weight",
            ),
            (
                "model.vision_tower.blocks.2.7.spatial_block.norm1.bias",
                "vision_tower.blocks.2.7.spatial_block.window_attn.norm.bias",
            ),
            (
                "model.vision_tower.blocks.0.0.spatial_block.window_attn.qkv.weight",
                "vision_tower.blocks.0.0.spatial_block.window_attn.fn.qkv.weight",
            ),
            (
                "model.vision_tower.blocks.0.0.spatial_block.norm2.weight",
                "vision_tower.blocks.0.0.spatial_block.ffn.norm.weight",
            ),
            (
                "model.vision_tower.blocks.0.0.spatial_block.ffn.fc2.bias",
                "vision_tower.blocks.0.0.spatial_block.ffn.fn.net.fc2.bias",
            ),
            (
                "model.vision_tower.blocks.1.0.channel_block.conv2.bias",
                "vision_tower.blocks.1.0.channel_block.conv2.fn.dw.bias",
            ),
            (
                "model.vision_tower.blocks.1.0.channel_block.norm1.weight",
                "vision_tower.blocks.1.0.channel_block.channel_attn.norm.weight",
            ),
            (
                "model.vision_tower.blocks.1.0.channel_block.channel_attn.proj.weight",
                "vision_tower.blocks.1.0.channel_block.channel_attn.fn.proj.weight",
            ),
            (
                "model.multi_modal_projector.image_projection.weight",
                "image_projection",
            ),
            (
                "model.multi_modal_projector.image_position_embed.row_embeddings.weight",
                "image_pos_embed.row_embeddings.weight",
            ),
            (
                "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed",
                "visual_temporal_embed.pos_idx_to_embed",
            ),
            (
                "model.multi_modal_projector.image_proj_norm.weight",
                "image_proj_norm.weight",
            ),
            (
                "model.language_model.decoder.layers.0.encoder_attn.k_proj.weight",
                "language_model.model.decoder.layers.0.encoder_attn.k_proj.weight",
            ),
            ("lm_head.weight", "language_model.lm_head.weight"),
        ];
        for (hf, orig) in pairs {
            assert_eq!(original_name(hf), orig, "{hf}");
            assert_eq!(hf_name(orig).as_deref(), Some(hf), "{orig}");
        }
    }
}
