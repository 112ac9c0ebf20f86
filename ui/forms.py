"""Form widgets <-> recipes, generated from the libraries' registries.

The Merge tab's columns and shared parameters come from :data:`merging.methods.REGISTRY`, the
Adapters tab's from :data:`merging.adapters.ADAPTER_METHODS`; both forms show the recipe YAML
they stand for and read it back. The recipes' own classes validate; nothing here knows a method.
"""

from __future__ import annotations

import math
from typing import Any

from checkpoints.errors import WeightsmithError
from checkpoints.textfiles import load_yaml


def cell_value(value: Any) -> Any:
    """A table cell as typed by the user -> a recipe value (number, bool, list gradient, filters).

    Parsed with the project's YAML loader: a cell holding an alias bomb stays text (which the recipe then
    refuses in one line) instead of expanding in the worker.
    """
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # pandas' empty cell
        return None
    if isinstance(value, (int, float, bool, list, dict)):
        return value
    text = str(value).strip()
    if not text:
        return None
    try:
        return load_yaml(text, what="cell")
    except WeightsmithError:
        return text


def optional_number(value: str | float | None, name: str, *, empty: str, low: float | None = None,
                    high: float | None = None, integer: bool = False) -> float | int | None:
    """A number field whose empty value means a default: text on the page (a Textbox, since a gr.Number
    shows and sends 0 when empty), a number from an API client. Empty -> None; else the number, checked
    against ``low``/``high`` (inclusive) and ``integer``; anything else is one line naming the field and
    what empty means (``empty``, e.g. "the suggested layer")."""
    kind = "a whole number" if integer else "a number"
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            value = float(text)
        except ValueError:
            # ascii(): a lone surrogate or a NUL typed into the field is shown escaped, never passed on
            raise WeightsmithError(f"{name} must be {kind} (empty: {empty}), not {ascii(text[:20])}") from None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WeightsmithError(f"{name} must be {kind} or empty, not {type(value).__name__}")
    if not math.isfinite(value) or (integer and value != int(value)):
        raise WeightsmithError(f"{name} must be {kind}, not {value:g}")
    if low is not None and value < low:
        raise WeightsmithError(f"{name} must be at least {low:g}, not {value:g}")
    if high is not None and value > high:
        raise WeightsmithError(f"{name} must be at most {high:g}, not {value:g}")
    return int(value) if integer else float(value)


def show_value(value: Any) -> str:
    """A recipe value shown in a table cell (schedules in YAML flow style)."""
    import yaml

    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def table_rows(table: Any) -> list[list[Any]]:
    """Dataframe input (pandas, dict or list) -> list of rows."""
    if table is None:
        return []
    if hasattr(table, "values") and hasattr(table, "columns"):
        return [list(r) for r in table.values.tolist()]
    if isinstance(table, dict):
        return [list(r) for r in table.get("data", [])]
    return [list(r) for r in table]


def named_rows(table: Any) -> list[list[Any]]:
    """The rows whose first cell (a model or adapter reference) is filled in."""
    return [r for r in table_rows(table) if r and str(r[0] or "").strip()]


def parameter_values(table: Any) -> dict[str, Any]:
    """A (name, value, ...) table -> {name: value} for the cells that hold a value."""
    out = {}
    for row in table_rows(table):
        if row and row[0]:
            v = cell_value(row[1] if len(row) > 1 else None)
            if v is not None:
                out[str(row[0])] = v
    return out


# ---- Merge tab -------------------------------------------------------------------------

def merge_columns(method_name: str) -> list[str]:
    from merging.methods import get_method

    return ["model", *[p.name for p in get_method(method_name).model_parameters]]


def merge_default_row(method_name: str, model: str) -> list[str]:
    from merging.methods import get_method

    # Only a required value is filled in (a weight of 1); an optional one stays empty so the recipe
    # does not spell out a default the user never chose (no `density: 1.0` on every model).
    row = [model]
    for p in get_method(method_name).model_parameters:
        row.append(show_value(1.0 if p.required and p.default is None and p.type == "float" else None))
    return row


def merge_shared_rows(method_name: str, values: dict | None = None) -> list[list[str]]:
    from merging.methods import get_method

    values = values or {}
    return [[p.name, show_value(values.get(p.name, p.default)), p.help or p.type]
            for p in get_method(method_name).shared_parameters]


def takes_base(method_name: str) -> bool:
    """Whether the method takes a base model at all (the form leaves it out of the recipe when not)."""
    from merging.methods import get_method

    return get_method(method_name).needs_base != "none"


def merge_method_md(name: str) -> str:
    from merging.methods import get_method

    m = get_method(name)
    base = {"required": "needs a base model", "optional": "base model optional", "none": "no base model"}[m.needs_base]
    paper = f" · [paper]({m.paper_url})" if m.paper_url else ""
    extra = f" · {m.description}" if getattr(m, "description", "") else ""
    return f"**{m.label}** · {base}{paper}{extra}"


def merge_form_to_dict(method: str, base: str, models: Any, shared: Any, lines_on: bool, alpha_auto: bool,
                       alpha: float, beta: float, out_dtype: str, seed: Any) -> dict:
    """The Merge tab's widgets -> a mergekit-layout recipe mapping (what the YAML box shows)."""
    names = merge_columns(method)
    data: dict[str, Any] = {"merge_method": method}
    if base and takes_base(method):
        data["base_model"] = base
    entries = []
    for row in named_rows(models):
        params = {}
        for name, cell in zip(names[1:], row[1:]):
            v = cell_value(cell)
            if v is not None:
                params[name] = v
        entries.append({"model": str(row[0]).strip(), **({"parameters": params} if params else {})})
    data["models"] = entries
    shared_params = parameter_values(shared)
    if shared_params:
        data["parameters"] = shared_params
    if out_dtype:
        data["out_dtype"] = out_dtype
    if lines_on:
        data["lines"] = {"alpha": "auto" if alpha_auto else float(alpha), "beta": float(beta)}
    seed_v = cell_value(seed)
    if seed_v not in (None, ""):
        data["seed"] = int(seed_v)
    return data


def merge_yaml_from_form(*form) -> tuple[str, str]:
    """(YAML text, status line). The YAML is shown even when the recipe is not valid yet.

    ``form`` may end with the recipe box's current text: the recipe keys the form has no
    widget for (``tokenizer``, ``tokenizer_source``, ``chat_template``, ``dtype``) are kept from it.
    """
    import yaml

    current = form[10] if len(form) > 10 else ""
    data = merge_form_to_dict(*form[:10])
    data.update(_keys_without_widgets(current, data))
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)
    try:
        from merging.recipe import MergeRecipe

        text = MergeRecipe.from_dict(data).to_yaml()
        return text, "✓ recipe is valid"
    except WeightsmithError as e:
        return text, f"⚠ {e}"


def _keys_without_widgets(text: str, shown: dict) -> dict:
    """The top-level recipe keys in ``text`` that the form neither shows nor writes (empty if it does not parse)."""
    from merging.recipe import TOP_KEYS

    try:
        data = load_yaml(text or "", what="recipe")
    except WeightsmithError:
        return {}
    form_keys = {"merge_method", "base_model", "models", "slices", "parameters", "out_dtype", "lines", "seed"}
    return {k: v for k, v in data.items() if k in TOP_KEYS and k not in form_keys and k not in shown} \
        if isinstance(data, dict) else {}


def merge_yaml_untouched(*form) -> tuple[str, str]:
    """The YAML the form starts with, and no verdict yet: nothing is wrong before the user has acted."""
    return merge_yaml_from_form(*form)[0], ""


def merge_form_from_yaml(text: str) -> dict:
    """Parse the YAML box into widget values; raises WeightsmithError on a bad recipe."""
    from merging.multistage import is_multistage, parse_recipe_documents
    from merging.recipe import MergeRecipe

    docs = parse_recipe_documents(text)
    if is_multistage(docs):
        raise WeightsmithError(f"a multi-stage recipe ({len(docs)} stages) is edited in the YAML only "
                               "(the form shows one recipe); Merge runs it")
    recipe = MergeRecipe.from_dict(docs[0] if docs else None)
    if recipe.slices:
        raise WeightsmithError("slices recipes are edited in the YAML only (the form shows models recipes)")
    names = merge_columns(recipe.merge_method)
    rows = [[m.model, *[show_value(m.parameters.get(n)) for n in names[1:]]] for m in recipe.models]
    lines = recipe.lines
    return {
        "method": recipe.merge_method, "base": recipe.base_model or "",
        "models": {"headers": names, "data": rows or [[""] * len(names)]},
        "shared": merge_shared_rows(recipe.merge_method, recipe.parameters),
        "lines_on": lines is not None,
        "alpha_auto": lines is not None and lines.alpha == "auto",
        "alpha": 1.0 if lines is None or lines.alpha == "auto" else float(lines.alpha),
        "beta": 0.0 if lines is None else float(lines.beta),
        "out_dtype": recipe.out_dtype or "",
        "seed": "" if recipe.seed is None else str(recipe.seed),
    }


# ---- Adapters tab ----------------------------------------------------------------------

def adapter_method_choices() -> list[tuple[str, str]]:
    from merging.adapters import ADAPTER_METHODS

    return [(f"{m.label}{' ✓ exact in ΔW' if m.exact_in_delta_w else ''}", m.name) for m in ADAPTER_METHODS.values()]


def adapter_method_md(name: str) -> str:
    from merging.adapters import ADAPTER_METHODS

    m = ADAPTER_METHODS.get(name)
    if m is None:
        return ""
    exact = ("**exact in ΔW space**" if m.exact_in_delta_w
             else "**not exact in ΔW space** (A and B mixed separately: cross terms Bᵢ·Aⱼ)"
             if m.space == "factors" else "**not exact in ΔW space** (a rule on ΔWᵢ, then SVD)")
    return f"{m.description} · {exact} · output rank: {m.rank}"


def adapter_param_rows(name: str, values: dict | None = None) -> list[list[str]]:
    from merging.adapters import ADAPTER_METHODS

    m = ADAPTER_METHODS.get(name)
    values = values or {}
    return [[k, show_value(values.get(k, v))] for k, v in (m.parameters.items() if m else [])]


def mix_form_to_yaml(base: str, adapters: Any, method: str, params: Any, lines_on: bool, alpha: float,
                     beta: float, output: str) -> tuple[str, str]:
    """The Adapters tab's widgets -> (recipe YAML, status line)."""
    import yaml

    from merging.adapters import ADAPTER_METHODS, AdapterMixRecipe

    data: dict[str, Any] = {"base_model": base or "", "adapters": [], "method": method}
    for row in named_rows(adapters):
        w = cell_value(row[1] if len(row) > 1 else None)
        data["adapters"].append({"adapter": str(row[0]).strip(), "weight": 1.0 if w is None else w})
    defaults = dict(ADAPTER_METHODS[method].parameters) if method in ADAPTER_METHODS else {}
    # only what differs from the defaults
    p = {k: v for k, v in parameter_values(params).items() if defaults.get(k, object()) != v}
    if p:
        data["parameters"] = p
    if lines_on:
        data["lines"] = {"alpha": float(alpha), "beta": float(beta)}
    data["merge_into_base"] = output == "merged model"
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    try:
        AdapterMixRecipe.from_dict(data)
        return text, "✓ recipe is valid"
    except WeightsmithError as e:
        return text, f"⚠ {e}"


def mix_form_from_yaml(text: str) -> dict:
    """Parse the Adapters tab's recipe box into widget values (the reverse of :func:`mix_form_to_yaml`);
    raises WeightsmithError on a recipe the form cannot show."""
    from merging.adapters import AdapterMixRecipe

    recipe = AdapterMixRecipe.from_dict(load_yaml(text or "", what="mix recipe") or {})
    rows = []
    for i, entry in enumerate(recipe.adapters):
        if not isinstance(entry.adapter, str):
            raise WeightsmithError(f"adapters[{i}]: name an adapter (demo-adapter:NAME, ws:NAME or a Hub id); "
                                   "upload files in the Models tab first")
        rows.append([entry.adapter, show_value(entry.weight)])
    lines = recipe.lines
    if lines is not None and lines.alpha == "auto":
        raise WeightsmithError("lines: alpha auto is not offered for adapters here; give a number")
    return {
        "base": recipe.base_model, "adapters": {"headers": ["adapter", "weight"], "data": rows},
        "method": recipe.method, "params": adapter_param_rows(recipe.method, recipe.parameters),
        "lines_on": lines is not None, "alpha": 0.5 if lines is None else float(lines.alpha),
        "beta": 0.5 if lines is None else float(lines.beta),
        "output": "merged model" if recipe.merge_into_base else "adapter",
    }
