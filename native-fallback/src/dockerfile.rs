//! Dockerfiles read into the plan of a template build. The syntax is parsed by the
//! `parse-dockerfile` crate. This module decides what each instruction means for a template,
//! and refuses what SoulBox does not build, naming the line.
//!
//! - `FROM` names the base, one stage only.
//! - `RUN`, `COPY`, `ADD`, `ENV`, `ARG`, `WORKDIR` and `USER` are steps, in order. A shell
//!   form runs under the `SHELL` in force (`/bin/sh -c` by default).
//! - `CMD` and `ENTRYPOINT` make the start command, as Docker combines them.
//! - `HEALTHCHECK CMD` is the ready check.
//! - `EXPOSE`, `LABEL`, `MAINTAINER`, `STOPSIGNAL` and `VOLUME` change nothing in a sandbox and
//!   are accepted.
//! - `ONBUILD`, a second `FROM`, `RUN` flags (`--mount`, `--network`...), here-documents and
//!   `COPY --from` are refused.

use std::ops::Range;

use parse_dockerfile::{Command, HealthcheckArguments, Instruction, Source, UnescapedString};

/// What a Dockerfile asks for, in SoulBox's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildPlan {
    /// The base image or template (`FROM`).
    pub from: String,
    /// `ARG`s before `FROM`, with their defaults.
    pub global_args: Vec<(String, Option<String>)>,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The command a sandbox starts with (`ENTRYPOINT` then `CMD`), if any.
    pub start: Option<Vec<String>>,
    /// The command whose success makes a sandbox ready (`HEALTHCHECK CMD`), if any.
    pub ready: Option<Vec<String>>,
}

/// One step of a build, with the line it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Its line in the Dockerfile (from 1).
    pub line: usize,
    /// What it does.
    pub action: Action,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Runs a program (a shell form is already wrapped in the shell).
    Run(Vec<String>),
    /// Copies files of the build context.
    Copy {
        /// Paths in the context.
        sources: Vec<String>,
        /// Where in the image.
        dest: String,
        /// `--chown`, if given.
        chown: Option<String>,
        /// `--chmod` (octal), if given.
        chmod: Option<u32>,
    },
    /// Like `Copy`, and unpacks local archives.
    Add {
        /// Paths in the context.
        sources: Vec<String>,
        /// Where in the image.
        dest: String,
    },
    /// Sets environment variables.
    Env(Vec<(String, String)>),
    /// Declares a build argument, with its default.
    Arg(String, Option<String>),
    /// Sets the working directory.
    Workdir(String),
    /// Sets the user.
    User(String),
}

/// A Dockerfile refused: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Dockerfile line {line}: {message}")]
pub struct DockerfileError {
    /// The line (from 1).
    pub line: usize,
    /// What is wrong, for people.
    pub message: String,
}

/// The plan of the Dockerfile `text`.
pub fn plan(text: &str) -> Result<BuildPlan, DockerfileError> {
    let parsed = parse_dockerfile::parse(text)
        .map_err(|e| DockerfileError { line: e.line().max(1), message: e.to_string() })?;
    let line_of =
        |span: &Range<usize>| text[..span.start.min(text.len())].matches('\n').count() + 1;
    let refuse =
        |span: &Range<usize>, message: String| DockerfileError { line: line_of(span), message };
    let mut from: Option<String> = None;
    let mut global_args = Vec::new();
    let mut steps = Vec::new();
    let mut shell = vec!["/bin/sh".to_owned(), "-c".to_owned()];
    let (mut entrypoint, mut cmd, mut ready) = (None, None, None);
    for instruction in &parsed.instructions {
        let command =
            |arguments: &Command<'_>, shell: &[String], span: &Range<usize>| match arguments {
                Command::Exec(exec) => Ok(exec.value.iter().map(|s| s.value.to_string()).collect()),
                Command::Shell(script) => {
                    let mut argv = shell.to_vec();
                    argv.push(script.value.trim().to_owned());
                    Ok(argv)
                }
                _ => Err(refuse(span, "a command form SoulBox does not know".to_owned())),
            };
        let step = |span: &Range<usize>, action| Step { line: line_of(span), action };
        match instruction {
            Instruction::From(instruction) => {
                let span = &instruction.from.span;
                if from.is_some() {
                    return Err(refuse(
                        span,
                        "a second FROM: multi-stage builds are not supported yet".to_owned(),
                    ));
                }
                if let Some(flag) = instruction.options.first() {
                    return Err(refuse(
                        span,
                        format!("FROM --{} is not supported", flag.name.value),
                    ));
                }
                from = Some(instruction.image.value.to_string());
            }
            Instruction::Arg(instruction) => {
                for (name, default) in arguments_of(&instruction.arguments) {
                    if from.is_none() {
                        global_args.push((name, default));
                    } else {
                        steps.push(step(&instruction.arg.span, Action::Arg(name, default)));
                    }
                }
            }
            other => {
                let Some(_) = &from else {
                    let span = keyword_span(other);
                    return Err(refuse(
                        &span,
                        "the first instruction must be FROM (or ARG)".to_owned(),
                    ));
                };
                match other {
                    Instruction::Run(run) => {
                        if let Some(flag) = run.options.first() {
                            let message = format!("RUN --{} is not supported", flag.name.value);
                            return Err(refuse(&run.run.span, message));
                        }
                        if !run.here_docs.is_empty() {
                            let message = "here-documents are not supported yet".to_owned();
                            return Err(refuse(&run.run.span, message));
                        }
                        let argv = command(&run.arguments, &shell, &run.run.span)?;
                        steps.push(step(&run.run.span, Action::Run(argv)));
                    }
                    Instruction::Copy(copy) => {
                        let mut chown = None;
                        let mut chmod = None;
                        for flag in &copy.options {
                            match (flag.name.value.as_ref(), &flag.value) {
                                ("chown", Some(value)) => chown = Some(value.value.to_string()),
                                ("chmod", Some(value)) => {
                                    let mode = u32::from_str_radix(&value.value, 8)
                                        .ok()
                                        .filter(|mode| *mode <= 0o7777)
                                        .ok_or_else(|| {
                                            let message = format!(
                                                "COPY --chmod={}: an octal mode",
                                                value.value
                                            );
                                            refuse(&copy.copy.span, message)
                                        })?;
                                    chmod = Some(mode);
                                }
                                (name, _) => {
                                    let message = format!("COPY --{name} is not supported");
                                    return Err(refuse(&copy.copy.span, message));
                                }
                            }
                        }
                        let sources = paths(&copy.src).map_err(|m| refuse(&copy.copy.span, m))?;
                        let dest = copy.dest.value.to_string();
                        let copy_action = Action::Copy { sources, dest, chown, chmod };
                        steps.push(step(&copy.copy.span, copy_action));
                    }
                    Instruction::Add(add) => {
                        if let Some(flag) = add.options.first() {
                            let message = format!("ADD --{} is not supported", flag.name.value);
                            return Err(refuse(&add.add.span, message));
                        }
                        let sources = paths(&add.src).map_err(|m| refuse(&add.add.span, m))?;
                        if let Some(url) = sources.iter().find(|s| s.contains("://")) {
                            let message = format!(
                                "ADD of a URL ({url}) is not supported; RUN a download instead"
                            );
                            return Err(refuse(&add.add.span, message));
                        }
                        let dest = add.dest.value.to_string();
                        steps.push(step(&add.add.span, Action::Add { sources, dest }));
                    }
                    Instruction::Env(env) => {
                        let pairs = env_pairs(&env.arguments.value)
                            .map_err(|m| refuse(&env.env.span, m))?;
                        steps.push(step(&env.env.span, Action::Env(pairs)));
                    }
                    Instruction::Workdir(workdir) => {
                        let dir = workdir.arguments.value.to_string();
                        steps.push(step(&workdir.workdir.span, Action::Workdir(dir)));
                    }
                    Instruction::User(user) => {
                        let name = user.arguments.value.to_string();
                        steps.push(step(&user.user.span, Action::User(name)));
                    }
                    Instruction::Shell(instruction) => {
                        shell = instruction.arguments.iter().map(|s| s.value.to_string()).collect();
                    }
                    Instruction::Cmd(instruction) => {
                        cmd = Some(command(&instruction.arguments, &shell, &instruction.cmd.span)?);
                    }
                    Instruction::Entrypoint(instruction) => {
                        let span = &instruction.entrypoint.span;
                        entrypoint = Some(command(&instruction.arguments, &shell, span)?);
                    }
                    Instruction::Healthcheck(instruction) => {
                        ready = match &instruction.arguments {
                            HealthcheckArguments::Cmd { arguments, .. } => {
                                Some(command(arguments, &shell, &instruction.healthcheck.span)?)
                            }
                            _ => None,
                        };
                    }
                    Instruction::Onbuild(instruction) => {
                        let message = "ONBUILD is not supported".to_owned();
                        return Err(refuse(&instruction.onbuild.span, message));
                    }
                    // EXPOSE, LABEL, MAINTAINER, STOPSIGNAL, VOLUME: nothing for a sandbox.
                    _ => {}
                }
            }
        }
    }
    let from = from.ok_or_else(|| DockerfileError {
        line: text.lines().count().max(1),
        message: "no FROM: a Dockerfile names its base".to_owned(),
    })?;
    // Docker's rule: CMD gives ENTRYPOINT its arguments, or is the command alone.
    let start = match (entrypoint, cmd) {
        (Some(mut entrypoint), Some(cmd)) => {
            entrypoint.extend(cmd);
            Some(entrypoint)
        }
        (entrypoint, cmd) => entrypoint.or(cmd),
    };
    Ok(BuildPlan { from, global_args, steps, start, ready })
}

/// The span of an instruction's keyword.
fn keyword_span(instruction: &Instruction<'_>) -> Range<usize> {
    match instruction {
        Instruction::Add(i) => i.add.span.clone(),
        Instruction::Cmd(i) => i.cmd.span.clone(),
        Instruction::Copy(i) => i.copy.span.clone(),
        Instruction::Entrypoint(i) => i.entrypoint.span.clone(),
        Instruction::Env(i) => i.env.span.clone(),
        Instruction::Run(i) => i.run.span.clone(),
        Instruction::User(i) => i.user.span.clone(),
        Instruction::Workdir(i) => i.workdir.span.clone(),
        Instruction::Shell(i) => i.shell.span.clone(),
        Instruction::Healthcheck(i) => i.healthcheck.span.clone(),
        _ => 0..0,
    }
}

/// The paths of a COPY or ADD (here-documents refused).
fn paths(sources: &[Source<'_>]) -> Result<Vec<String>, String> {
    sources
        .iter()
        .map(|source| match source {
            Source::Path(path) => Ok(path.value.to_string()),
            _ => Err("here-documents are not supported yet".to_owned()),
        })
        .collect()
}

/// `ARG NAME[=DEFAULT]`'s name and default.
fn arguments_of(argument: &UnescapedString<'_>) -> Vec<(String, Option<String>)> {
    argument
        .value
        .split_whitespace()
        .map(|word| match word.split_once('=') {
            Some((name, default)) => (name.to_owned(), Some(unquote(default))),
            None => (word.to_owned(), None),
        })
        .collect()
}

/// `ENV`'s pairs: `KEY=VALUE ...` (values may be double-quoted), or the legacy `KEY VALUE`.
fn env_pairs(arguments: &str) -> Result<Vec<(String, String)>, String> {
    let words = split_words(arguments);
    let first = words.first().ok_or_else(|| "ENV needs KEY=VALUE".to_owned())?;
    if !first.contains('=') {
        let (key, value) = arguments
            .trim()
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("ENV {first} has no value (write ENV {first}=VALUE)"))?;
        return Ok(vec![(key.to_owned(), value.trim().to_owned())]);
    }
    words
        .iter()
        .map(|word| {
            word.split_once('=')
                .map(|(key, value)| (key.to_owned(), unquote(value)))
                .ok_or_else(|| format!("ENV {word}: every variable needs KEY=VALUE"))
        })
        .collect()
}

/// Words separated by whitespace, a double-quoted run (with `\"` inside) kept whole.
fn split_words(text: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted, mut escaped) = (Vec::new(), String::new(), false, false);
    for c in text.chars() {
        match c {
            _ if escaped => {
                word.push(c);
                escaped = false;
            }
            '\\' => {
                word.push(c);
                escaped = true;
            }
            '"' => {
                word.push(c);
                quoted = !quoted;
            }
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// A value without its surrounding double quotes, `\"` and `\\` unescaped.
fn unquote(value: &str) -> String {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => value.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn a_dockerfile_becomes_its_steps_start_command_and_ready_check() {
        let text = "\
ARG VERSION=1.0
FROM localhost:5000/base:latest
ENV GREETING=\"hello world\" COUNT=3
ENV LEGACY some value
WORKDIR /app
COPY --chown=1000:1000 app.py lib/ /app/
ADD data.tar /data
RUN apt-get install -y \\
      curl
RUN [\"python3\", \"-c\", \"print(1)\"]
USER user
SHELL [\"/bin/bash\", \"-o\", \"pipefail\", \"-c\"]
RUN echo piped | cat
EXPOSE 8080
LABEL team=research
HEALTHCHECK CMD curl -f http://localhost:8080/
ENTRYPOINT [\"python3\", \"/app/app.py\"]
CMD [\"--port\", \"8080\"]
";
        let plan = plan(text).expect("a plan");
        assert_eq!(plan.from, "localhost:5000/base:latest");
        assert_eq!(plan.global_args, vec![("VERSION".to_owned(), Some("1.0".to_owned()))]);
        let lines: Vec<usize> = plan.steps.iter().map(|s| s.line).collect();
        assert_eq!(lines, vec![3, 4, 5, 6, 7, 8, 10, 11, 13]);
        let actions: Vec<&Action> = plan.steps.iter().map(|s| &s.action).collect();
        assert_eq!(
            actions[0],
            &Action::Env(vec![
                ("GREETING".to_owned(), "hello world".to_owned()),
                ("COUNT".to_owned(), "3".to_owned())
            ])
        );
        assert_eq!(actions[1], &Action::Env(vec![("LEGACY".to_owned(), "some value".to_owned())]));
        assert_eq!(actions[2], &Action::Workdir("/app".to_owned()));
        assert_eq!(
            actions[3],
            &Action::Copy {
                sources: argv(&["app.py", "lib/"]),
                dest: "/app/".to_owned(),
                chown: Some("1000:1000".to_owned()),
                chmod: None,
            }
        );
        assert_eq!(
            actions[4],
            &Action::Add { sources: argv(&["data.tar"]), dest: "/data".to_owned() }
        );
        let Action::Run(run) = actions[5] else { panic!("{:?}", actions[5]) };
        assert_eq!(run[..2], argv(&["/bin/sh", "-c"]));
        assert!(run[2].contains("apt-get install -y") && run[2].contains("curl"), "{run:?}");
        assert_eq!(actions[6], &Action::Run(argv(&["python3", "-c", "print(1)"])));
        assert_eq!(actions[7], &Action::User("user".to_owned()));
        assert_eq!(
            actions[8],
            &Action::Run(argv(&["/bin/bash", "-o", "pipefail", "-c", "echo piped | cat"]))
        );
        assert_eq!(plan.start, Some(argv(&["python3", "/app/app.py", "--port", "8080"])));
        assert_eq!(
            plan.ready,
            Some(argv(&["/bin/bash", "-o", "pipefail", "-c", "curl -f http://localhost:8080/"]))
        );
    }

    #[test]
    fn what_is_not_built_is_refused_with_its_line() {
        let cases = [
            ("FROM a\nRUN true\nFROM b\n", 3, "multi-stage"),
            ("FROM a\n\nRUN --mount=type=cache,target=/x true\n", 3, "RUN --mount"),
            ("FROM a\nCOPY --from=builder /x /y\n", 2, "COPY --from"),
            ("FROM a\nONBUILD RUN true\n", 2, "ONBUILD"),
            ("FROM a\nADD https://example.invalid/x.tar /x\n", 2, "URL"),
            ("RUN true\n", 1, "FROM"),
            ("# only a comment\n", 1, "FROM"),
            ("FROM a\nENV ALONE\n", 2, "has no value"),
            ("FROM a\nCOPY --chmod=rwx a b\n", 2, "an octal mode"),
        ];
        for (text, line, words) in cases {
            let error = plan(text).expect_err(text);
            assert_eq!(error.line, line, "{text:?}: {error}");
            assert!(error.to_string().contains(words), "{text:?}: {error}");
        }
    }

    #[test]
    fn copy_takes_an_octal_mode() {
        let plan = plan("FROM a\nCOPY --chmod=0750 run.sh /bin/\n").expect("a plan");
        assert!(matches!(plan.steps[0].action, Action::Copy { chmod: Some(0o750), .. }));
    }

    #[test]
    fn a_malformed_dockerfile_is_an_error_with_its_line() {
        let error =
            plan("FROM a\nRUN true\nNOTANINSTRUCTION x\n").expect_err("unknown instruction");
        assert_eq!(error.line, 3, "{error}");
        let error = plan("FROM a\n\nCOPY only-a-source\n").expect_err("COPY without a destination");
        assert_eq!(error.line, 3, "{error}");
        // As in Docker, a CMD that is not a JSON array is a shell command.
        let shell = plan("FROM a\nCMD [\"unterminated\n").expect("a plan");
        assert_eq!(shell.start, Some(argv(&["/bin/sh", "-c", "[\"unterminated"])));
    }

    #[test]
    fn cmd_alone_or_entrypoint_alone_is_the_start_command() {
        let cmd = plan("FROM a\nCMD sleep 10\n").expect("a plan");
        assert_eq!(cmd.start, Some(argv(&["/bin/sh", "-c", "sleep 10"])));
        let entrypoint = plan("FROM a\nENTRYPOINT [\"/serve\"]\n").expect("a plan");
        assert_eq!(entrypoint.start, Some(argv(&["/serve"])));
        assert_eq!(plan("FROM a\n").expect("a plan").start, None);
    }
}
