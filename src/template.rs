//! Argv templates: a job's command is configured as an argv array whose elements may contain
//! `{id}`, `{queue}`, `{code}` and `{payload.FIELD}`.
//!
//! Templates are parsed when the config is loaded, so a typo in a placeholder is a
//! configuration error at start-up rather than a failed job at 3 a.m. Rendering substitutes
//! inside single argv elements only: no shell ever sees the result, so a payload value cannot
//! inject a second command or split into extra arguments.
//!
//! Nor can it change what the command does: argv[0] is always literal (the program is the
//! config's choice), and a placeholder that starts an element may not produce a value that
//! starts with `-`, which the program would read as an option (`find {payload.dir}` with
//! `-delete`). Written `--name={payload.x}` the value is an option's value and may start with
//! anything; `allow_option_values = true` lifts the rule for a command that wants options
//! from its payload.

use serde_json::{Map, Value};

/// One argv element: literal text and placeholders in order.
#[derive(Debug, Clone, PartialEq)]
struct ArgTemplate(Vec<Segment>);

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    Id,
    Queue,
    Code,
    /// A dotted path into the payload object, e.g. `["options", "file"]`.
    PayloadField(Vec<String>),
}

/// A parsed argv template.
#[derive(Debug, Clone, PartialEq)]
pub struct ArgvTemplate {
    args: Vec<ArgTemplate>,
    /// Whether a placeholder may produce a whole argument that starts with `-`.
    allow_option_values: bool,
}

/// The facts about one job that a template may refer to.
pub struct JobFacts<'a> {
    pub id: i64,
    pub queue: &'a str,
    pub code: &'a str,
    pub payload: &'a Map<String, Value>,
}

impl ArgvTemplate {
    /// Parses `argv`; errors name `key[index]` so the operator finds the element.
    pub fn parse(argv: &[String], key: &str) -> Result<Self, String> {
        if argv.is_empty() || argv[0].trim().is_empty() {
            return Err(format!("`{key}` must be a non-empty argv array"));
        }
        let args: Vec<ArgTemplate> = argv
            .iter()
            .enumerate()
            .map(|(index, arg)| {
                parse_arg(arg).map_err(|error| format!("`{key}[{index}]` ({arg:?}): {error}"))
            })
            .collect::<Result<_, _>>()?;
        if args[0].has_placeholder() {
            return Err(format!(
                "`{key}[0]` ({:?}) is the program and must be literal: no placeholder",
                argv[0]
            ));
        }
        Ok(ArgvTemplate {
            args,
            allow_option_values: false,
        })
    }

    /// Lets placeholders produce whole arguments that start with `-` (options).
    pub fn allowing_option_values(mut self, allow: bool) -> Self {
        self.allow_option_values = allow;
        self
    }

    /// Renders the argv for one job. A payload field that is missing or null, or a value
    /// that would turn into an option, is an error that fails the job.
    pub fn render(&self, job: &JobFacts<'_>) -> Result<Vec<String>, String> {
        self.args
            .iter()
            .enumerate()
            .map(|(index, arg)| {
                let value = render_arg(arg, job)?;
                if !self.allow_option_values
                    && arg.starts_with_placeholder()
                    && value.starts_with('-')
                {
                    return Err(format!(
                        "argument {index} ({}) would start with `-` and be read as an option; \
                         write the element as `--name={}` or set allow_option_values = true",
                        arg.first_placeholder_text(),
                        arg.first_placeholder_text()
                    ));
                }
                Ok(value)
            })
            .collect()
    }
}

impl ArgTemplate {
    fn has_placeholder(&self) -> bool {
        self.0.iter().any(|s| !matches!(s, Segment::Literal(_)))
    }

    /// Whether the first character of the rendered element comes from a placeholder.
    fn starts_with_placeholder(&self) -> bool {
        self.0
            .first()
            .is_some_and(|s| !matches!(s, Segment::Literal(_)))
    }

    /// The first placeholder as written, for messages.
    fn first_placeholder_text(&self) -> String {
        match self.0.iter().find(|s| !matches!(s, Segment::Literal(_))) {
            Some(Segment::Id) => "{id}".into(),
            Some(Segment::Queue) => "{queue}".into(),
            Some(Segment::Code) => "{code}".into(),
            Some(Segment::PayloadField(path)) => format!("{{payload.{}}}", path.join(".")),
            _ => String::new(),
        }
    }
}

fn parse_arg(text: &str) -> Result<ArgTemplate, String> {
    let mut segments = Vec::new();
    let mut literal = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                literal.push('}');
            }
            '{' => {
                let mut name = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    name.push(c);
                }
                if !closed {
                    return Err("unclosed `{` (write `{{` for a literal brace)".into());
                }
                if !literal.is_empty() {
                    segments.push(Segment::Literal(std::mem::take(&mut literal)));
                }
                segments.push(parse_placeholder(&name)?);
            }
            '}' => return Err("unmatched `}` (write `}}` for a literal brace)".into()),
            _ => literal.push(c),
        }
    }
    if !literal.is_empty() {
        segments.push(Segment::Literal(literal));
    }
    Ok(ArgTemplate(segments))
}

fn parse_placeholder(name: &str) -> Result<Segment, String> {
    match name {
        "id" => Ok(Segment::Id),
        "queue" => Ok(Segment::Queue),
        "code" => Ok(Segment::Code),
        _ => match name.strip_prefix("payload.") {
            Some(path) if path.split('.').all(|part| !part.is_empty()) => Ok(
                Segment::PayloadField(path.split('.').map(str::to_owned).collect()),
            ),
            _ => Err(format!(
                "unknown placeholder `{{{name}}}`; known: {{id}}, {{queue}}, {{code}}, {{payload.FIELD}}"
            )),
        },
    }
}

fn render_arg(arg: &ArgTemplate, job: &JobFacts<'_>) -> Result<String, String> {
    let mut out = String::new();
    for segment in &arg.0 {
        match segment {
            Segment::Literal(text) => out.push_str(text),
            Segment::Id => out.push_str(&job.id.to_string()),
            Segment::Queue => out.push_str(job.queue),
            Segment::Code => out.push_str(job.code),
            Segment::PayloadField(path) => out.push_str(&payload_field(job.payload, path)?),
        }
    }
    Ok(out)
}

fn payload_field(payload: &Map<String, Value>, path: &[String]) -> Result<String, String> {
    let missing = || format!("payload field `{}` is missing or null", path.join("."));
    let mut value = payload.get(&path[0]).ok_or_else(missing)?;
    for part in &path[1..] {
        value = value.get(part).ok_or_else(missing)?;
    }
    match value {
        Value::Null => Err(missing()),
        Value::String(text) => Ok(text.clone()),
        other => Ok(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn argv(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn render(template: &[&str], payload: Value) -> Result<Vec<String>, String> {
        let payload = payload.as_object().unwrap().clone();
        let facts = JobFacts {
            id: 42,
            queue: "ui_job",
            code: "csv_export",
            payload: &payload,
        };
        ArgvTemplate::parse(&argv(template), "job.command")?.render(&facts)
    }

    #[test]
    fn substitutes_inside_elements() {
        let out = render(
            &["php", "--job={code}", "{id}", "q:{queue}", "{payload.user}"],
            json!({"user": "julia"}),
        )
        .unwrap();
        assert_eq!(out, ["php", "--job=csv_export", "42", "q:ui_job", "julia"]);
    }

    #[test]
    fn payload_values_never_split_into_arguments() {
        let out = render(&["echo", "{payload.x}"], json!({"x": "a b; rm -rf /"})).unwrap();
        assert_eq!(out, ["echo", "a b; rm -rf /"]);
    }

    #[test]
    fn nested_fields_numbers_and_objects_render() {
        let out = render(
            &["echo", "{payload.a.b}", "{payload.n}", "{payload.o}"],
            json!({"a": {"b": "deep"}, "n": 7, "o": {"k": true}}),
        )
        .unwrap();
        assert_eq!(out, ["echo", "deep", "7", r#"{"k":true}"#]);
    }

    #[test]
    fn missing_or_null_fields_fail_the_job() {
        let error = render(&["x", "{payload.file}"], json!({})).unwrap_err();
        assert!(error.contains("payload field `file`"), "{error}");
        assert!(render(&["x", "{payload.file}"], json!({"file": null})).is_err());
    }

    #[test]
    fn a_value_that_would_be_an_option_fails_the_job() {
        let error = render(&["find", "{payload.dir}"], json!({"dir": "-delete"})).unwrap_err();
        assert!(
            error.contains("{payload.dir}") && error.contains("option"),
            "{error}"
        );
        let out = render(&["find", "--name={payload.dir}"], json!({"dir": "-x"})).unwrap();
        assert_eq!(out, ["find", "--name=-x"]);
        let out = render(&["find", "{payload.dir}"], json!({"dir": "a-b"})).unwrap();
        assert_eq!(out, ["find", "a-b"]);
        let template = ArgvTemplate::parse(&argv(&["find", "{payload.dir}"]), "k")
            .unwrap()
            .allowing_option_values(true);
        let payload = json!({"dir": "-delete"}).as_object().unwrap().clone();
        let facts = JobFacts {
            id: 1,
            queue: "q",
            code: "c",
            payload: &payload,
        };
        assert_eq!(template.render(&facts).unwrap(), ["find", "-delete"]);
    }

    #[test]
    fn the_program_is_always_literal() {
        let error = ArgvTemplate::parse(&argv(&["{payload.bin}", "x"]), "job.command").unwrap_err();
        assert!(
            error.contains("job.command[0]") && error.contains("literal"),
            "{error}"
        );
        assert!(ArgvTemplate::parse(&argv(&["/bin/{code}"]), "k").is_err());
    }

    #[test]
    fn braces_escape_by_doubling() {
        let out = render(&["{{id}}", "a}}b"], json!({})).unwrap();
        assert_eq!(out, ["{id}", "a}b"]);
    }

    #[test]
    fn bad_templates_name_the_element() {
        let error = ArgvTemplate::parse(&argv(&["php", "{nope}"]), "job.command").unwrap_err();
        assert!(
            error.contains("job.command[1]") && error.contains("{nope}"),
            "{error}"
        );
        assert!(ArgvTemplate::parse(&argv(&["php", "{id"]), "k").is_err());
        assert!(ArgvTemplate::parse(&argv(&["php", "x}"]), "k").is_err());
        assert!(ArgvTemplate::parse(&argv(&["{payload.}"]), "k").is_err());
        assert!(ArgvTemplate::parse(&[], "k").is_err());
    }
}
