"""Plugin discovery, registration and the loading switches, through the real entry-point machinery."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli
from plugin_dists import ALPHA, BETA, BROKEN_IMPORT, GOOD, WRONG_TYPE, make_distribution

from trtkit.errors import OptionError, PluginError
from trtkit.registry import load_plugins
from trtkit.stages import Calibrator, Component, GraphPass, Option

BUILTINS = {
    "torch_export", "passes", "calibrators", "qdq", "onnxruntime_builder", "tensorrt", "evaluators",
    "jetson", "ptq", "pruning", "sparsity", "ray_engine",
} | {f"commands.{name}" for name in ("export", "prune", "optimize", "calibrate", "quantize", "build", "inspect",
                                     "eval", "run", "init")}


@pytest.fixture(scope="module")
def third_party(tmp_path_factory) -> dict[str, str]:
    """Environment whose PYTHONPATH holds five installed third-party plugin distributions."""
    folder = tmp_path_factory.mktemp("site")
    make_distribution(folder, "good-plugin", {"good_plugin": GOOD}, version="1.2.3")
    make_distribution(folder, "broken-plugin", {"broken_plugin": BROKEN_IMPORT})
    make_distribution(folder, "alpha-plugin", {"alpha_plugin": ALPHA})
    make_distribution(folder, "beta-plugin", {"beta_plugin": BETA})
    make_distribution(folder, "wrong-type-plugin", {"wrong_type_plugin": WRONG_TYPE})
    path = os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path}


def plugins_json(env: dict[str, str], *args: str) -> tuple[dict, str]:
    result = run_cli("plugins", "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def by_name(listing: dict) -> dict[str, dict]:
    return {plugin["name"]: plugin for plugin in listing["plugins"]}


def test_builtins_are_discovered_through_entry_points():
    listing, _ = plugins_json({})
    plugins = by_name(listing)
    assert set(plugins) >= BUILTINS
    for name in BUILTINS:
        assert plugins[name]["source"] == "builtin"
        assert plugins[name]["distribution"] == "trtkit"
        assert plugins[name]["module"] == f"trtkit.plugins.{name}"


def test_third_party_plugin_registers_and_adds_a_command(third_party):
    listing, _ = plugins_json(third_party)
    good = by_name(listing)["good_plugin"]
    assert good["source"] == "third-party"
    assert good["version"] == "1.2.3"
    assert good["distribution"] == "good-plugin"
    assert good["registers"] == {"calibrators": ["max-abs"]}
    assert good["hooks"] == ["register_calibrators", "register_commands"]
    hello = run_cli("hello-plugin", env=third_party)
    assert hello.returncode == 0 and "hello from good_plugin" in hello.stdout
    assert run_cli("exit-with", "4", env=third_party).returncode == 4
    version = run_cli("--version", env=third_party)
    assert "plugin good_plugin 1.2.3" in version.stdout


def test_hook_filter(third_party):
    listing, _ = plugins_json(third_party, "--hook", "register_commands")
    assert "good_plugin" in by_name(listing)
    assert "alpha_plugin" not in by_name(listing)


def test_broken_plugins_are_reported_and_skipped(third_party):
    listing, stderr = plugins_json(third_party)
    plugins = by_name(listing)
    problems = "\n".join(listing["problems"])
    # fails on import
    assert "broken_plugin" not in plugins
    assert "plugin 'broken_plugin' skipped: failed to import" in problems
    assert "broken on purpose" in problems
    # registers a name another plugin took: skipped as a whole, naming both plugins
    assert "alpha_plugin" in plugins and plugins["alpha_plugin"]["registers"] == {"passes": ["shared-name"]}
    assert "beta_plugin" not in plugins
    assert "plugin 'beta_plugin' skipped: pass name 'shared-name' is already registered by plugin 'alpha_plugin'" \
        in problems
    # registers something that is not a component
    assert "wrong_type_plugin" not in plugins
    assert "expected trtkit.stages.Calibrator" in problems
    # each problem is one warning line on stderr, never a traceback; everything else still works
    assert "Traceback" not in stderr
    assert sum(line.startswith("warning: plugin") for line in stderr.splitlines()) == 3
    assert "good_plugin" in plugins and set(plugins) >= BUILTINS


def test_allow_list_loads_only_named_third_party_plugins(third_party):
    listing, _ = plugins_json({**third_party, "TRTKIT_LOAD_PLUGINS": "good_plugin"})
    names = set(by_name(listing))
    assert names == BUILTINS | {"good_plugin"}
    assert listing["problems"] == []  # broken plugins were never imported
    listing, _ = plugins_json({**third_party, "TRTKIT_LOAD_PLUGINS": ""})
    assert set(by_name(listing)) == BUILTINS


def test_disable_autoload_keeps_only_builtins(third_party):
    listing, _ = plugins_json({**third_party, "TRTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert set(by_name(listing)) == BUILTINS


def test_block_by_name(third_party):
    listing, _ = plugins_json({**third_party, "TRTKIT_BLOCK_PLUGINS": "alpha_plugin,broken_plugin"})
    names = set(by_name(listing))
    assert "alpha_plugin" not in names and "broken_plugin" not in names
    # with alpha blocked, beta's pass name is free again
    assert "beta_plugin" in names
    result = run_cli("--no-plugin", "good_plugin", "--no-plugin", "passes", "plugins", "--json", env=third_party)
    names = set(by_name(json.loads(result.stdout)))
    assert "good_plugin" not in names and "passes" not in names and "calibrators" in names


def test_in_process_registration_is_transactional():
    class Half:
        """Registers one valid calibrator, then fails: neither may be registered."""

        @staticmethod
        def register_calibrators(register):
            register(Calibrator(name="half-ok", description="", compute_amax=lambda s: 1.0))
            raise PluginError("second registration failed")

    from trtkit.hookspecs import hookimpl

    Half.register_calibrators = hookimpl(Half.register_calibrators)
    registry = load_plugins(extra_modules=[Half])
    assert "half-ok" not in registry.stages["calibrators"]
    assert any("second registration failed" in p for p in registry.problems)


def test_unknown_component_name_lists_close_matches():
    class Plugin:
        pass

    from trtkit.hookspecs import hookimpl

    @hookimpl
    def register_passes(register):
        register(GraphPass(name="fold-batchnorm", description="", apply=lambda a: a))

    Plugin.register_passes = staticmethod(register_passes)
    registry = load_plugins(extra_modules=[Plugin])
    with pytest.raises(OptionError, match=r"unknown pass 'fold-batchnrom' \(did you mean: fold-batchnorm\?\)"):
        registry.get("passes", "fold-batchnrom")


def test_option_schema_validation():
    component = Component(
        name="demo", description="",
        options={
            "percentile": Option("float", 99.99, "percentile to keep"),
            "bins": Option("int", 2048),
            "mode": Option("str", "a", choices=("a", "b")),
            "data": Option("path", required=True),
            "flag": Option("bool", False),
        },
    )
    resolved = component.resolve_options({"data": "x.npy", "bins": "1024", "flag": "yes", "percentile": 99})
    assert resolved == {"percentile": 99.0, "bins": 1024, "mode": "a", "data": "x.npy", "flag": True}
    with pytest.raises(OptionError, match=r"has no option 'percentil' \(did you mean: percentile\?\)"):
        component.resolve_options({"data": "x", "percentil": 1})
    with pytest.raises(OptionError, match="needs option 'data'"):
        component.resolve_options({})
    with pytest.raises(OptionError, match="option 'bins': invalid literal"):
        component.resolve_options({"data": "x", "bins": "many"})
    with pytest.raises(OptionError, match="option 'bins' must be int, got bool"):
        component.resolve_options({"data": "x", "bins": True})
    with pytest.raises(OptionError, match="option 'mode' must be one of a, b"):
        component.resolve_options({"data": "x", "mode": "c"})


def test_readme_plugin_story_names_real_commands():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "trtkit plugins" in readme
    assert "pip install plugins_contrib/trtkit-onnxslim" in readme


def test_every_registration_hook_fills_its_registry():
    """One plugin implementing every register_* hook: each component lands in its own stage registry."""
    from trtkit.hookspecs import hookimpl
    from trtkit.stages import Builder, EvaluationResult, Evaluator, Exporter

    class Everything:
        @staticmethod
        @hookimpl
        def register_exporters(register):
            register(Exporter(name="echo-export", description="", export=lambda source, output: output))

        @staticmethod
        @hookimpl
        def register_passes(register):
            register(GraphPass(name="echo-pass", description="", apply=lambda artifact: artifact))

        @staticmethod
        @hookimpl
        def register_calibrators(register):
            register(Calibrator(name="echo-calibrator", description="", compute_amax=lambda stats: 2.0))

        @staticmethod
        @hookimpl
        def register_builders(register):
            register(Builder(name="echo-builder", description="", build=lambda model, output: output,
                             available=lambda: "needs an echo device"))

        @staticmethod
        @hookimpl
        def register_evaluators(register):
            register(Evaluator(name="echo-eval", description="",
                               evaluate=lambda models: EvaluationResult({"n": len(models)}, passed=False)))

    registry = load_plugins(extra_modules=[Everything])
    assert registry.exporter("echo-export").export("m", "out.onnx") == "out.onnx"
    assert registry.graph_pass("echo-pass").apply("artifact") == "artifact"
    assert registry.calibrator("echo-calibrator").compute_amax(None) == 2.0
    assert registry.builder("echo-builder").available() == "needs an echo device"
    assert registry.evaluator("echo-eval").evaluate(["a", "b"]).data == {"n": 2}
    info = registry.plugins[Everything.__name__]
    assert info.hooks == ["register_builders", "register_calibrators", "register_evaluators",
                          "register_exporters", "register_passes"]
    names = {"exporters": "echo-export", "passes": "echo-pass", "calibrators": "echo-calibrator",
             "builders": "echo-builder", "evaluators": "echo-eval"}
    for stage, name in names.items():
        assert registry.owner(stage, name) == Everything.__name__
