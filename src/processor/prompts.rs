//! Florence-2's task table and prompt builder, as transformers' `Florence2Processor` has them.
//!
//! A task token alone (`<OD>`) becomes a fixed English question; a task token followed by input
//! (`<CAPTION_TO_PHRASE_GROUNDING> a red car`) fills that input into a template. Text without a task
//! token is passed through unchanged.

use super::pytext::py_strip;
use crate::{Error, Result};

/// How the generated answer of a task is parsed by [`crate::processor::postprocess`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParseType {
    PureText,
    Ocr,
    PhraseGrounding,
    DescriptionWithBboxes,
    Bboxes,
    Polygons,
    DescriptionWithBboxesOrPolygons,
}

impl ParseType {
    /// Every parse type a task can use, in the order of the post-processor configuration.
    pub const ALL: [ParseType; 7] = [
        ParseType::Ocr,
        ParseType::PhraseGrounding,
        ParseType::PureText,
        ParseType::DescriptionWithBboxes,
        ParseType::Polygons,
        ParseType::Bboxes,
        ParseType::DescriptionWithBboxesOrPolygons,
    ];

    /// The name transformers uses (a key of `post_processor_config`).
    pub fn name(self) -> &'static str {
        match self {
            ParseType::PureText => "pure_text",
            ParseType::Ocr => "ocr",
            ParseType::PhraseGrounding => "phrase_grounding",
            ParseType::DescriptionWithBboxes => "description_with_bboxes",
            ParseType::Bboxes => "bboxes",
            ParseType::Polygons => "polygons",
            ParseType::DescriptionWithBboxesOrPolygons => "description_with_bboxes_or_polygons",
        }
    }
}

/// What a task token turns into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prompt {
    /// The task token must be the whole text; it is replaced by this question.
    WithoutInput(&'static str),
    /// The rest of the text (stripped) replaces `{input}` in this template.
    WithInput(&'static str),
}

/// One row of the task table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Task {
    pub token: &'static str,
    pub prompt: Prompt,
    pub parse_type: ParseType,
}

use ParseType as P;
use Prompt::{WithInput as In, WithoutInput as No};

/// The 15 tasks. Within each kind the order is transformers' dict order, which decides which task
/// wins when a text holds several task tokens.
pub const TASKS: [Task; 15] = [
    Task {
        token: "<OCR>",
        prompt: No("What is the text in the image?"),
        parse_type: P::PureText,
    },
    Task {
        token: "<OCR_WITH_REGION>",
        prompt: No("What is the text in the image, with regions?"),
        parse_type: P::Ocr,
    },
    Task {
        token: "<CAPTION>",
        prompt: No("What does the image describe?"),
        parse_type: P::PureText,
    },
    Task {
        token: "<DETAILED_CAPTION>",
        prompt: No("Describe in detail what is shown in the image."),
        parse_type: P::PureText,
    },
    Task {
        token: "<MORE_DETAILED_CAPTION>",
        prompt: No("Describe with a paragraph what is shown in the image."),
        parse_type: P::PureText,
    },
    Task {
        token: "<OD>",
        prompt: No("Locate the objects with category name in the image."),
        parse_type: P::DescriptionWithBboxes,
    },
    Task {
        token: "<DENSE_REGION_CAPTION>",
        prompt: No("Locate the objects in the image, with their descriptions."),
        parse_type: P::DescriptionWithBboxes,
    },
    Task {
        token: "<REGION_PROPOSAL>",
        prompt: No("Locate the region proposals in the image."),
        parse_type: P::Bboxes,
    },
    Task {
        token: "<CAPTION_TO_PHRASE_GROUNDING>",
        prompt: In("Locate the phrases in the caption: {input}"),
        parse_type: P::PhraseGrounding,
    },
    Task {
        token: "<REFERRING_EXPRESSION_SEGMENTATION>",
        prompt: In("Locate {input} in the image with mask"),
        parse_type: P::Polygons,
    },
    Task {
        token: "<REGION_TO_SEGMENTATION>",
        prompt: In("What is the polygon mask of region {input}"),
        parse_type: P::Polygons,
    },
    Task {
        token: "<OPEN_VOCABULARY_DETECTION>",
        prompt: In("Locate {input} in the image."),
        parse_type: P::DescriptionWithBboxesOrPolygons,
    },
    Task {
        token: "<REGION_TO_CATEGORY>",
        prompt: In("What is the region {input}?"),
        parse_type: P::PureText,
    },
    Task {
        token: "<REGION_TO_DESCRIPTION>",
        prompt: In("What does the region {input} describe?"),
        parse_type: P::PureText,
    },
    Task {
        token: "<REGION_TO_OCR>",
        prompt: In("What text is in the region {input}?"),
        parse_type: P::PureText,
    },
];

/// The task whose token is exactly `token`, if any.
pub fn find_task(token: &str) -> Option<&'static Task> {
    TASKS.iter().find(|t| t.token == token)
}

/// The parse type for a task token; unknown tasks are plain text, as in transformers.
pub fn parse_type_for(task: &str) -> ParseType {
    find_task(task).map_or(ParseType::PureText, |t| t.parse_type)
}

/// Turns user text into the prompt the model was trained on (transformers' `_construct_prompts`).
///
/// Task tokens are matched as substrings, like transformers does: a task without input must be the
/// whole text, else this returns the same error text transformers raises as ValueError.
pub fn construct_prompt(text: &str) -> Result<String> {
    let mut prompt = text.to_string();
    for task in TASKS.iter() {
        if let No(question) = task.prompt {
            if prompt.contains(task.token) {
                if prompt != task.token {
                    return Err(Error::invalid(format!(
                        "Task token {} should be the only content in the prompt.",
                        task.token
                    )));
                }
                prompt = question.to_string();
                break;
            }
        }
    }
    for task in TASKS.iter() {
        if let In(template) = task.prompt {
            if prompt.contains(task.token) {
                let removed = prompt.replace(task.token, "");
                // `str.format` substitutes once per `{input}` and never re-reads the inserted text.
                prompt = template.replace("{input}", py_strip(&removed));
                break;
            }
        }
    }
    Ok(prompt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_eight_plain_and_seven_templated_tasks() {
        let plain = TASKS.iter().filter(|t| matches!(t.prompt, No(_))).count();
        assert_eq!((plain, TASKS.len() - plain), (8, 7));
    }

    #[test]
    fn builds_prompts_like_transformers() {
        assert_eq!(
            construct_prompt("<OD>").unwrap(),
            "Locate the objects with category name in the image."
        );
        assert_eq!(
            construct_prompt("<CAPTION_TO_PHRASE_GROUNDING>  a red car \n").unwrap(),
            "Locate the phrases in the caption: a red car"
        );
        // Every occurrence of the token is removed before stripping.
        assert_eq!(
            construct_prompt("x<REGION_TO_OCR>y<REGION_TO_OCR>").unwrap(),
            "What text is in the region xy?"
        );
        assert_eq!(construct_prompt("just text").unwrap(), "just text");
        assert_eq!(construct_prompt("").unwrap(), "");
    }

    #[test]
    fn extra_text_after_a_plain_task_is_an_error() {
        let err = construct_prompt("<OCR> extra").unwrap_err().to_string();
        assert_eq!(
            err,
            "Task token <OCR> should be the only content in the prompt."
        );
        // Two plain task tokens: the first in table order must be alone, so this fails too.
        assert!(construct_prompt("<CAPTION><OD>").is_err());
    }

    #[test]
    fn unknown_tasks_parse_as_text() {
        assert_eq!(parse_type_for("<OD>"), ParseType::DescriptionWithBboxes);
        assert_eq!(parse_type_for("<NOPE>"), ParseType::PureText);
    }
}
