//! The two released checkpoint layouts, and how each is recognized: a config by its vision model type, a
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
    /// The layout of a parsed config.json: Microsoft's names its vision model `davit`.
    pub fn of_config(config: &Value) -> Layout {
        match config
            .pointer("/vision_config/model_type")
            .and_then(Value::as_str)
        {
            Some("davit") => Layout::Original,
            _ => Layout::HfNative,
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
