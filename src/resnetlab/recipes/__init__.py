"""Shipped recipes: YAML files beside this module, each a partial :class:`~resnetlab.config.RunConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resnetlab.config import load_yaml
from resnetlab.errors import ConfigError

RECIPE_DIR = Path(__file__).parent


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A shipped recipe by name, or any YAML file by path. The tree's ``recipe`` key names it."""
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        tree = load_yaml(shipped)
        tree.setdefault("recipe", name_or_path)
        return tree
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        tree = load_yaml(path)
        tree.setdefault("recipe", path.stem)
        return tree
    raise ConfigError(f"unknown recipe '{name_or_path}'; shipped recipes: {', '.join(list_recipes())} "
                      "(or pass a path to a YAML file)")


def describe_recipes() -> list[dict[str, str]]:
    rows = []
    for name in list_recipes():
        tree = load_yaml(RECIPE_DIR / f"{name}.yaml")
        rows.append({
            "name": name,
            "description": str(tree.get("description", "")),
            "data": str(tree.get("data", {}).get("spec", "synthetic-signs")),
            "model": str(tree.get("model", {}).get("name", "resnet20")),
            "epochs": str(tree.get("train", {}).get("epochs", "")),
        })
    return rows
