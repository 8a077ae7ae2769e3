//! The two released checkpoint layouts, and how each is recognized: a config by its sub-models' types, a
//! weights file by its tensor names. Loading a model checks that the two agree (a config of one layout
//! beside weights of the other is refused, naming both).

use serde_json::Value;

/// Which released checkpoint layout a config, a processor or a weights file follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// transformers' own Florence-2 (`model.vision_tower.*`, `<image>` placeholder tokens in input_ids).
    HfNative,
    /// Microsoft's remote-code Florence-2 (`vision_tower.*`, image features prepended to the text).
    Original,
}

impl Layout {
    /// The layout of a parsed config.json. Microsoft's remote code names its vision model `davit` and its
    /// language model `florence2_language`, and a config with either is of its layout: exports of it leave
    /// one of them out or empty (the released config.json has no text model_type, onnx-community's export
    /// an empty vision one). transformers' own config names them `florence_vision` and `bart`, and refuses
    /// `florence2_language`.
    pub fn of_config(config: &Value) -> Layout {
        let model_type = |pointer: &str| config.pointer(pointer).and_then(Value::as_str);
        if model_type("/vision_config/model_type") == Some("davit")
            || model_type("/text_config/model_type") == Some("florence2_language")
        {
            Layout::Original
        } else {
            Layout::HfNative
        }
    }

    /// The layout of a weights file's tensor names; `None` when they hold no Florence-2 vision tower.
    pub fn of_weight_names<'a>(names: impl IntoIterator<Item = &'a String>) -> Option<Layout> {
        let (mut hf_native, mut original) = (false, false);
        for name in names {
            hf_native |= name.starts_with("model.vision_tower.");
            original |= name.starts_with("vision_tower.");
        }
        match (hf_native, original) {
            (true, _) => Some(Layout::HfNative),
            (false, true) => Some(Layout::Original),
            (false, false) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fixture_config(name: &str) -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
            .join("config.json");
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    #[test]
    fn configs_are_of_the_layout_whose_code_loads_them() {
        // Microsoft's remote code: the released configs, and onnx-community's exports of them (no auto_map,
        // an empty vision model_type, transformers' own config refuses their `florence2_language`).
        for name in [
            "release/microsoft_Florence-2-base",
            "release/microsoft_Florence-2-large",
            "release/microsoft_Florence-2-large-ft",
            "release/onnx-community_Florence-2-base",
            "release/onnx-community_Florence-2-base-ft",
            "tiny/original",
        ] {
            assert_eq!(
                Layout::of_config(&fixture_config(name)),
                Layout::Original,
                "{name}"
            );
        }
        assert_eq!(
            Layout::of_config(&fixture_config("tiny/hf")),
            Layout::HfNative
        );
        // transformers' own config class fills in what config.json leaves out.
        assert_eq!(Layout::of_config(&serde_json::json!({})), Layout::HfNative);
    }
}
