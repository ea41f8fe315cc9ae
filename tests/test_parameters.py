"""Each parameter, default and preset declared once (neumo.parameters): the compiled pipeline, every
component, every `neumo` option and every stage function agree with the declaration."""

import argparse
import inspect

import pytest
import yaml

from neumo import cli, parameters, stages

DECLARED = [p.name for p in parameters.RUN_TIME]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from pipelines import full

    path = tmp_path_factory.mktemp("compiled") / "p.yaml"
    assert full.main(["--compile", str(path)]) == 0
    spec, _ = yaml.safe_load_all(path.read_text())
    return spec


def _components():
    from pipelines import full

    return {**full.CPU_COMPONENTS, **full.GPU_COMPONENTS}


def _stage_functions():
    return {name: f for name, f in vars(stages).items() if inspect.isfunction(f) and f.__module__ == stages.__name__
            and not name.startswith("_")}


def _cli_defaults() -> dict[tuple[str, str], object]:
    """{(subcommand, dest): default} of every `neumo` option."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {(cmd, action.dest): action.default for cmd, s in sub.choices.items() for action in s._actions
            if action.dest != "help"}


@pytest.mark.parametrize("name", DECLARED)
def test_the_compiled_pipeline_takes_the_declared_default(name, compiled):
    declared = parameters.BY_NAME[name]
    spec = compiled["root"]["inputDefinitions"]["parameters"][name]
    if declared.required:
        assert not spec.get("isOptional", False), name
    else:
        assert spec["defaultValue"] == declared.default, name


@pytest.mark.parametrize("name", DECLARED)
def test_components_stages_and_options_agree_with_the_declaration(name):
    """Generated from the declaration: wherever a parameter of that name appears, it has no
    default (the caller must pass it) or the declared one."""
    declared = parameters.BY_NAME[name].default
    found = 0
    for cname, component in _components().items():
        spec = (component.component_spec.inputs or {}).get(name)
        if spec is not None:
            found += 1
            assert spec.default is None or spec.default == declared, f"component {cname}: {name}"
    for fname, func in _stage_functions().items():
        arg = inspect.signature(func).parameters.get(name)
        if arg is not None:
            found += 1
            assert arg.kind is inspect.Parameter.KEYWORD_ONLY or fname == "failed_row", f"stages.{fname}: {name}"
            assert arg.default in (inspect.Parameter.empty, declared), f"stages.{fname}: {name}"
    for (cmd, dest), default in _cli_defaults().items():
        if dest == name:
            found += 1
            assert default in (None, declared), f"neumo {cmd} --{name}"
    assert found, f"{name} is declared but no component, stage or option takes it"


def test_every_component_input_named_like_a_parameter_is_fed_by_it(tmp_path):
    """The factory wires pipeline parameters to component inputs by name: a component input with a
    parameter's name (but no default) reads that parameter in the compiled YAML."""
    from tests.test_pipeline import _compile, _tasks

    spec, _ = _compile(tmp_path)
    for task_name, (_, task) in _tasks(spec).items():
        inputs = task.get("inputs", {}).get("parameters", {})
        for name, source in inputs.items():
            if name in parameters.BY_NAME and not parameters.BY_NAME[name].graph:
                assert source.get("componentInputParameter", "").endswith(name), (task_name, name, source)


def test_stage_functions_take_keywords_only():
    """Every stage function a component calls takes its arguments by keyword only."""
    import re

    called = set()
    for component in _components().values():
        called |= set(re.findall(r"stages\.(\w+)\(", inspect.getsource(component.python_func)))
    assert {"ingest", "plan", "train", "evaluate", "aggregate"} <= called
    for name in called:
        kinds = {p.kind for p in inspect.signature(getattr(stages, name)).parameters.values()}
        if name not in ("trial_metadata", "shown_metrics", "trial_record"):  # helpers over one record
            assert kinds == {inspect.Parameter.KEYWORD_ONLY}, name


def test_presets_are_overrides_of_declared_parameters():
    for name, overrides in parameters.PRESETS.items():
        values = parameters.preset(name)
        assert set(values) == set(parameters.BY_NAME), name
        for key in overrides:
            assert key in parameters.BY_NAME, (name, key)
    assert parameters.preset("demo")["search_space"]["loss"] == parameters.DEFAULT_SEARCH_SPACE["loss"]
    assert parameters.preset("demo")["search_space"]["pixels"] == [128]


def test_parse_is_strict_and_names_the_parameter():
    assert parameters.parse("epochs", "3") == 3
    assert parameters.parse("epochs", 3.0) == 3
    assert parameters.parse("clahe_clip", "2") == 2.0
    assert parameters.parse("search_space", '{"pixels": [64]}') == {"pixels": [64]}
    for name, bad in (("epochs", "abc"), ("epochs", "2.5"), ("epochs", True), ("clahe_clip", "inf"),
                      ("search_space", "[1]"), ("dataset_uri", 3)):
        with pytest.raises(ValueError, match=f"bad value for {name}"):
            parameters.parse(name, bad)
    with pytest.raises(ValueError, match="unknown pipeline parameter 'pixles'"):
        parameters.parse("pixles", "1")
    with pytest.raises(ValueError, match="unknown dimension"):
        parameters.apply(parameters.defaults(), {"search_space": {"pixel": [64]}})
    merged = parameters.apply(parameters.defaults(), {"search_space": '{"pixels": [64]}'})["search_space"]
    assert merged == {**parameters.DEFAULT_SEARCH_SPACE, "pixels": [64]}


def test_the_declaration_needs_only_the_standard_library():
    """pipelines import neumo.parameters and neumo.trial to compile: nothing else may come along."""
    import ast
    import sys

    for module in (parameters, __import__("neumo.trial", fromlist=["x"])):
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                top = n.split(".")[0]
                assert top in sys.stdlib_module_names or n.split(".")[0] == "__future__" or n == "neumo.parameters", (module.__name__, n)
