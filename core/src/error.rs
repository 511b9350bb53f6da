//! The one error of configuration and change validation: the field and what
//! is wrong with it, never the offending value (it may be a secret's digest).

use std::fmt;

/// A configuration error: the field (as a path such as `tokens[3].role`) and
/// what is wrong with it. Never carries the offending value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// serde_json's messages can quote the offending string value; keep only the
/// kind of error and its position, plus the expected alternatives for unknown
/// fields (which name fields, not values). The phrase completes a subject:
/// "tokens[0] has unknown field `x`", "the request body is not valid JSON".
pub fn describe_json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let msg = e.to_string();
    let what = match e.classify() {
        Category::Syntax | Category::Eof => "is not valid JSON".to_owned(),
        Category::Io => "could not be read".to_owned(),
        Category::Data => {
            let msg = msg.split(" at line").next().unwrap_or_default();
            if msg.starts_with("unknown field") {
                format!("has {msg}")
            } else if msg.starts_with("missing field") {
                format!("is {msg}")
            } else if let Some(expected) = msg.split(", expected ").nth(1) {
                let expected = expected.split(" at line").next().unwrap_or("");
                format!("has the wrong type: expected {expected}")
            } else {
                "is invalid".to_owned()
            }
        }
    };
    format!("{what} (line {}, column {})", e.line(), e.column())
}
