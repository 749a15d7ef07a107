//! Cells in each language: output, results, state, errors, the scientific stack.

use base64::Engine as _;
use soulbox_runtime::{ExecRequest, Language, Termination};
use soulbox_tests::{run, sandbox};

fn cell(language: &str, code: &str) -> ExecRequest {
    ExecRequest::cell(Language::parse(language), code)
}

#[tokio::test]
async fn hello_world_in_each_language() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    for (language, code) in [
        ("python", "print('hello from python')"),
        ("javascript", "console.log('hello from javascript')"),
        ("ruby", "puts 'hello from ruby'"),
    ] {
        let output = run(&dispatcher, &sandbox, cell(language, code)).await;
        assert_eq!(output.stdout, format!("hello from {language}\n"), "{output:?}");
        assert_eq!(output.termination, Some(Termination::Exited { code: 0 }), "{output:?}");
        assert_eq!(output.tier, soulbox_runtime::Tier::Wasm);
    }
}

#[tokio::test]
async fn last_expression_is_the_result_in_each_language() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    for (language, code, expected) in [
        ("python", "x = 6\nx * 7", "42"),
        ("javascript", "const x = 6; x * 7", "42"),
        ("ruby", "x = 6\nx * 7", "42"),
    ] {
        let output = run(&dispatcher, &sandbox, cell(language, code)).await;
        assert_eq!(output.results.len(), 1, "{language}: {output:?}");
        assert_eq!(output.results[0].data["text/plain"], expected, "{language}");
        assert!(output.results[0].is_main_result);
    }
}

#[tokio::test]
async fn state_persists_across_cells_in_each_language() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    for (language, first, second) in [
        ("python", "x = 5", "x * 2"),
        ("javascript", "let x = 5", "x * 2"),
        ("ruby", "x = 5", "x * 2"),
    ] {
        let output = run(&dispatcher, &sandbox, cell(language, first)).await;
        assert!(output.error.is_none(), "{language}: {output:?}");
        let output = run(&dispatcher, &sandbox, cell(language, second)).await;
        assert_eq!(output.results[0].data["text/plain"], "10", "{language}: {output:?}");
    }
}

#[tokio::test]
async fn exceptions_become_errors_with_name_value_and_traceback() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    for (language, code, name, value) in [
        ("python", "def f():\n    return 1 / 0\nf()", "ZeroDivisionError", "division by zero"),
        (
            "javascript",
            "function f() { throw new TypeError('bad thing') }\nf()",
            "TypeError",
            "bad thing",
        ),
        ("ruby", "def f = raise(ArgumentError, 'bad thing')\nf", "ArgumentError", "bad thing"),
    ] {
        let output = run(&dispatcher, &sandbox, cell(language, code)).await;
        let error =
            output.error.as_ref().unwrap_or_else(|| panic!("{language}: no error in {output:?}"));
        assert_eq!(error.name, name, "{language}");
        assert_eq!(error.value, value, "{language}");
        assert!(error.traceback.contains(name), "{language}: {}", error.traceback);
        assert_eq!(output.termination, Some(Termination::Exited { code: 1 }));
        // The kernel survives its exception.
        let output = run(&dispatcher, &sandbox, cell(language, "1 + 1")).await;
        assert_eq!(output.results[0].data["text/plain"], "2", "{language}: {output:?}");
    }
}

#[tokio::test]
async fn syntax_errors_are_errors_not_crashes() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    for (language, code, name) in [
        ("python", "def (:", "SyntaxError"),
        ("javascript", "let = = 1", "SyntaxError"),
        ("ruby", "def (", "SyntaxError"),
    ] {
        let output = run(&dispatcher, &sandbox, cell(language, code)).await;
        let error = output.error.unwrap_or_else(|| panic!("{language}: no error"));
        assert_eq!(error.name, name, "{language}");
    }
}

#[tokio::test]
async fn javascript_console_formats_objects_as_node_does() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    let code = "console.log({a: 1, b: [1, 'x']}, 'text', 2); console.error('oops')";
    let output = run(&dispatcher, &sandbox, cell("javascript", code)).await;
    assert_eq!(output.stdout, "{ a: 1, b: [ 1, \"x\" ] } text 2\noops\n");
}

#[tokio::test]
async fn python_exit_code_is_the_termination() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    let output = run(&dispatcher, &sandbox, cell("python", "import sys\nsys.exit(3)")).await;
    assert_eq!(output.termination, Some(Termination::Exited { code: 3 }));
    assert_eq!(output.exit_code, Some(3));
}

#[tokio::test]
async fn numpy_and_pandas_work() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    let code = "import numpy as np, pandas as pd\n\
                df = pd.DataFrame({'a': np.arange(5), 'b': np.arange(5) ** 2})\n\
                print(int(df['b'].sum()))\n\
                df";
    let output = run(&dispatcher, &sandbox, cell("python", code)).await;
    assert_eq!(output.stdout, "30\n", "{output:?}");
    let data = &output.results[0].data;
    assert!(data["text/plain"].contains("16"), "{data:?}");
    assert!(data["text/html"].contains("<table"), "a DataFrame also renders as HTML: {data:?}");
}

#[tokio::test]
async fn matplotlib_figure_comes_back_as_png() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    let code = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('squares')\nplt.show()";
    let output = run(&dispatcher, &sandbox, cell("python", code)).await;
    assert!(output.error.is_none(), "{output:?}");
    let figure =
        output.results.iter().find(|r| r.data.contains_key("image/png")).expect("a PNG result");
    let png = base64::engine::general_purpose::STANDARD
        .decode(&figure.data["image/png"])
        .expect("base64");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a real PNG");
    assert!(png.len() > 1000, "a real plot, not an empty image: {} bytes", png.len());
}

#[tokio::test]
async fn environment_reaches_the_code() {
    let (dispatcher, sandbox, _dir) = sandbox().await;
    for (language, code) in [
        ("python", "import os\nos.environ['GREETING']"),
        ("javascript", "process.env.GREETING"),
        ("ruby", "ENV['GREETING']"),
    ] {
        let mut request = cell(language, code);
        request.env.insert("GREETING".into(), "hi there".into());
        let output = run(&dispatcher, &sandbox, request).await;
        let text = &output.results[0].data["text/plain"];
        assert!(text.contains("hi there"), "{language}: {text}");
    }
}

#[tokio::test]
async fn random_numbers_differ_between_sandboxes() {
    // The generators' state is frozen into the pre-initialised image; each kernel reseeds.
    for (language, code) in [
        ("python", "import random\nrandom.random()"),
        ("javascript", "Math.random()"),
        ("ruby", "rand"),
    ] {
        let (dispatcher, first, _a) = sandbox().await;
        let (_, second, _b) = sandbox().await;
        let a = run(&dispatcher, &first, cell(language, code)).await;
        let b = run(&dispatcher, &second, cell(language, code)).await;
        assert_ne!(a.results[0].data["text/plain"], b.results[0].data["text/plain"], "{language}");
    }
}
