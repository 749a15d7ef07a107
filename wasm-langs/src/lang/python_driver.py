# The SoulBox kernel driver for CPython, loaded once when the pack is pre-initialised.
# `run` executes one cell in __main__'s namespace, Jupyter-style: the value of a final
# expression and every open matplotlib figure become results, an exception becomes an error,
# and the report goes to the host in /.soulbox-report.json: a 32-byte header (the cell's number
# and the JSON's length, each as 16 hex digits) then the JSON, written in place with pwrite
# (truncating and rewriting a file makes ext4 flush it, which costs a millisecond a cell).
import ast
import base64
import gc
import io
import json
import os
import random
import sys
import traceback

REPORT_PATH = "/.soulbox-report.json"
MIME_METHODS = (
    ("text/html", "_repr_html_"),
    ("text/markdown", "_repr_markdown_"),
    ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"),
    ("application/json", "_repr_json_"),
    ("text/latex", "_repr_latex_"),
)


def _formats(value):
    data = {"text/plain": repr(value)}
    for mime, method in MIME_METHODS:
        render = getattr(value, method, None)
        if not callable(render):
            continue
        try:
            rendered = render()
        except Exception:
            continue
        if rendered is None:
            continue
        if isinstance(rendered, bytes):
            rendered = base64.b64encode(rendered).decode("ascii")
        elif not isinstance(rendered, str):
            rendered = json.dumps(rendered, default=str)
        data[mime] = rendered
    return data


# What `display()` showed during the current cell.
_displayed = []


def display(*values, **kwargs):
    """IPython's `display`: each value becomes a result of the cell (not its main one)."""
    for value in values:
        _displayed.append({"data": _formats(value), "is_main_result": False})


class _Rich:
    """A value shown through one MIME type, like IPython.display's HTML, JSON, Image..."""

    mime = "text/plain"

    def __init__(self, data=None, url=None, filename=None, **kwargs):
        if data is None and filename is not None:
            with open(filename, "rb" if self.binary else "r") as file:
                data = file.read()
        self.data = data

    binary = False

    def __repr__(self):
        return "<%s object>" % type(self).__name__


def _rich_class(name, mime, method, binary=False):
    def render(self):
        return self.data
    return type(name, (_Rich,), {"mime": mime, method: render, "binary": binary})


HTML = _rich_class("HTML", "text/html", "_repr_html_")
Markdown = _rich_class("Markdown", "text/markdown", "_repr_markdown_")
SVG = _rich_class("SVG", "image/svg+xml", "_repr_svg_")
Latex = _rich_class("Latex", "text/latex", "_repr_latex_")
Image = _rich_class("Image", "image/png", "_repr_png_", binary=True)
JSON = _rich_class("JSON", "application/json", "_repr_json_")


def _install_ipython_display():
    """A small `IPython.display` (display, HTML, Markdown, SVG, Latex, Image, JSON), so that
    notebook code runs unchanged; IPython itself is not in the pack."""
    import types
    ipython = types.ModuleType("IPython")
    module = types.ModuleType("IPython.display")
    for name in ("display", "HTML", "Markdown", "SVG", "Latex", "Image", "JSON"):
        setattr(module, name, globals()[name])
    ipython.display = module
    # Libraries that find IPython ask it for the running shell: there is none.
    ipython.get_ipython = lambda: None
    # matplotlib works around IPython releases before 8.24; this one needs none of that.
    ipython.version_info = (9, 0, 0, "")
    ipython.__version__ = "9.0.0"
    sys.modules.setdefault("IPython", ipython)
    sys.modules.setdefault("IPython.display", module)
    import builtins
    builtins.display = display


def _value(value):
    """A chart value as JSON: numbers as floats, dates as ISO text, the rest as text."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, str):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _label(artist, fallback):
    label = artist.get_label()
    return fallback if not label or label.startswith("_") else label


def _axes_chart(axes):
    """E2B's chart data of one plot: its lines, points, bars or pie slices."""
    from matplotlib.container import BarContainer
    from matplotlib.collections import PathCollection
    from matplotlib.patches import Wedge

    title = axes.get_title()
    wedges = [p for p in axes.patches if isinstance(p, Wedge)]
    if wedges:
        labels = [t.get_text() for t in axes.texts]
        return {
            "type": "pie",
            "title": title,
            "elements": [
                {
                    "label": labels[i] if i < len(labels) else _label(w, str(i)),
                    "angle": float(w.theta2 - w.theta1),
                    "radius": float(w.r),
                }
                for i, w in enumerate(wedges)
            ],
        }
    axis_data = {
        "title": title,
        "x_label": axes.get_xlabel() or None,
        "y_label": axes.get_ylabel() or None,
        "x_unit": None,
        "y_unit": None,
    }
    bars = [c for c in axes.containers if isinstance(c, BarContainer)]
    if bars:
        ticks = {round(float(t), 6): l.get_text() for t, l in zip(axes.get_xticks(), axes.get_xticklabels())}
        elements = []
        for number, container in enumerate(bars):
            group = _label(container, str(number))
            for rect in container.patches:
                center = round(float(rect.get_x() + rect.get_width() / 2), 6)
                elements.append({
                    "label": ticks.get(center, _value(center)),
                    "group": group,
                    "value": _value(rect.get_height()),
                })
        return dict(axis_data, type="bar", elements=elements)
    lines = [line for line in axes.get_lines()]
    scatters = [c for c in axes.collections if isinstance(c, PathCollection)]
    if not lines and not scatters:
        return None
    elements = [
        {
            "label": _label(line, "line %d" % i),
            "points": [[_value(x), _value(y)] for x, y in zip(line.get_xdata(orig=True), line.get_ydata(orig=True))],
        }
        for i, line in enumerate(lines)
    ] + [
        {
            "label": _label(collection, "points %d" % i),
            "points": [[_value(x), _value(y)] for x, y in collection.get_offsets()],
        }
        for i, collection in enumerate(scatters)
    ]
    return dict(
        axis_data,
        type="line" if lines else "scatter",
        elements=elements,
        x_ticks=[_value(t) for t in axes.get_xticks()],
        x_tick_labels=[t.get_text() for t in axes.get_xticklabels()],
        x_scale=axes.get_xscale(),
        y_ticks=[_value(t) for t in axes.get_yticks()],
        y_tick_labels=[t.get_text() for t in axes.get_yticklabels()],
        y_scale=axes.get_yscale(),
    )


def _chart(figure):
    """E2B's chart data of a figure (drawn already): one chart, or a superchart of several."""
    try:
        charts = [c for c in (_axes_chart(axes) for axes in figure.get_axes()) if c]
    except Exception:
        return None
    if len(charts) == 1:
        return charts[0]
    if not charts:
        return None
    title = figure._suptitle.get_text() if figure._suptitle is not None else ""
    return {"type": "superchart", "title": title, "elements": charts}


def _figures():
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return []
    figures = []
    for number in pyplot.get_fignums():
        figure = pyplot.figure(number)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", bbox_inches="tight")
        data = {
            "image/png": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "text/plain": repr(figure),
        }
        chart = _chart(figure)
        if chart is not None:
            data["e2b/chart"] = json.dumps(chart)
        figures.append({"data": data, "is_main_result": False})
    pyplot.close("all")
    return figures


def _error(exc, skip_frames):
    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None:
            tb = tb.tb_next
    lines = traceback.format_exception(type(exc), exc, tb)
    return {"name": type(exc).__name__, "value": str(exc), "traceback": "".join(lines)}


def _exit_code(exc):
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


_report_fd = None


def _send_report(cell, report):
    global _report_fd
    if _report_fd is None:
        _report_fd = os.open(REPORT_PATH, os.O_WRONLY | os.O_CREAT, 0o600)
    payload = json.dumps(report, default=str).encode()
    data = b"%016x%016x" % (cell, len(payload)) + payload
    written = 0
    while written < len(data):
        written += os.pwrite(_report_fd, data[written:], written)


def run(cell, code, env, fresh):
    global _report_fd
    if fresh:
        _report_fd = None
        random.seed()
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()
    # The cell's variables hold for this cell only.
    saved_env = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    namespace = sys.modules["__main__"].__dict__
    results, error, exit_code = [], None, 0
    main_result = None
    try:
        tree = ast.parse(code, "<cell>", "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, "<cell>", "exec"), namespace)
        if last is not None:
            value = eval(compile(last, "<cell>", "eval"), namespace)
            if value is not None:
                namespace["_"] = value
                main_result = {"data": _formats(value), "is_main_result": True}
    except SystemExit as exc:
        exit_code = _exit_code(exc)
    except SyntaxError as exc:
        error, exit_code = _error(exc, 2), 1
    except BaseException as exc:
        error, exit_code = _error(exc, 1), 1
    results.extend(_displayed)
    _displayed.clear()
    try:
        results.extend(_figures())
    except Exception as exc:
        error, exit_code = error or _error(exc, 0), 1
    if main_result is not None:
        results.append(main_result)
    sys.stdout.flush()
    sys.stderr.flush()
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _send_report(cell, {"results": results, "error": error, "exit_code": exit_code})


def initialize(imports):
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.chdir("/home/user")
    _install_ipython_display()
    for name in imports:
        __import__(name)
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.show = lambda *args, **kwargs: None
    # Everything loaded so far lives in the image: move it out of the collector's reach, so a
    # cell's garbage collection does not walk (and fault in) the whole preloaded heap.
    gc.collect()
    gc.freeze()
