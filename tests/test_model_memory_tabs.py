"""Model and Memory tabs through their handlers (issue 12, item 4): the input-size box sets
data.image_size and the size the Memory tab estimates for; the Model tab says what size a run
really feeds; the Memory tab's text, bars and table give the same, equally rounded numbers."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

gr = pytest.importorskip("gradio")

from core import memory
from core.config import RunConfig
from ui import common, tab_memory, tab_model
from ui.common import AppContext

MIB = r"([\d,]+\.\d)\u00a0MiB"


@pytest.fixture(scope="module")
def tabs(tmp_path_factory):
    """The Model and Memory tabs built on one context: their controllers (``build``'s result)."""
    tmp = tmp_path_factory.mktemp("model_memory")
    ctx = AppContext(manager=None, data_dir=tmp / "data", runs_dir=tmp / "runs")
    with gr.Blocks():
        ctx.session = gr.State(dict)
        ctx.browser_id = gr.BrowserState(None)
        with gr.Tab("Model"):
            model = tab_model.build(ctx)
        with gr.Tab("Memory"):
            mem = tab_memory.build(ctx)
    return SimpleNamespace(ctx=ctx, model=model, memory=mem)


@pytest.fixture(scope="module")
def ctx(tabs):
    return tabs.ctx


def _memory(ctx, name="resnet18", stem=False, size=0, batch=8, opt="adam", prec="fp32"):
    calculate = tab_memory.MemoryTab(ctx).calculate
    return calculate({}, name, stem, "none", 0, batch, opt, prec, "8 GB", size, progress=lambda *a, **k: None)


def _describe(ctx, name, stem, size=0):
    return tab_model.ModelTab(ctx).describe({}, name, stem, size)[0]


def test_the_size_box_sets_data_image_size(tabs):
    ctx, box = tabs.ctx, tabs.model.w.image_size
    assert ctx.config_fields[box] == "data.image_size"
    values = {w: w.value for w in ctx.config_fields}
    assert common.config_from_widgets(ctx, values, session={}).data.image_size is None   # 0: the model's own
    values[box] = 224
    assert common.config_from_widgets(ctx, values, session={}).data.image_size == 224
    assert common.widget_updates(ctx, [box], RunConfig())[0]["value"] == 0


@pytest.mark.slow   # estimates a training step at 224×224
def test_the_memory_tab_estimates_for_the_size_set_on_the_model_tab(ctx):
    small, *_, small_table = _memory(ctx, size=0)
    large, *_, large_table = _memory(ctx, size=224)
    assert "3×32×32 input" in small and "3×224×224 input" in large

    def row(styler, component):
        return styler.data.set_index("component")["bytes"][component]
    assert row(large_table, "saved activations") > 40 * row(small_table, "saved activations")   # 49× the pixels
    required = "training step peak (simulated) = required"
    assert row(large_table, required) > row(small_table, required)


def test_the_model_tab_states_the_size_a_run_feeds(ctx):
    stem = next(c for c in ctx.config_fields if ctx.config_fields[c] == "model.small_input_stem")
    assert "resizing to 224" not in stem.label and "own size" in stem.info
    # ResNet-50 accepts the sample's 32×32 images as they are, stem or not.
    assert "fed 32×32 RGB images (their own size)" in _describe(ctx, "resnet50", False)
    assert "fed 32×32 RGB images" in _describe(ctx, "resnet50", True)
    assert "resized to 224×224 (they are 32×32; the input size set here)" in _describe(ctx, "resnet50", False, 224)
    # AlexNet does not take 32×32 without its stem: resized to its default.
    text = _describe(ctx, "alexnet", False)
    assert "resized to 224×224 (they are 32×32; alexnet needs at least" in text
    assert "fed 32×32" in _describe(ctx, "alexnet", True)
    assert "a run would stop before training" in _describe(ctx, "alexnet", False, 32)
    assert "below the 8×8 resnet50 accepts" in _describe(ctx, "resnet50", False, 4)


def test_model_shape_follows_the_size_box(ctx):
    assert tab_model.model_shape({}, "resnet50", False) == (10, 3, (32, 32))
    assert tab_model.model_shape({}, "resnet50", False, 224) == (10, 3, (224, 224))
    assert tab_model.model_shape({}, "alexnet", False) == (10, 3, (224, 224))


@pytest.mark.parametrize("opt,prec", [("adam", "fp32"), ("sgd", "bf16")])
def test_memory_text_bars_and_table_agree(ctx, opt, prec):
    text, bars, _, styler = _memory(ctx, "resnet18", False, 0, 16, opt, prec)
    table = styler.data.set_index("component")["MiB"]
    shown = lambda v: f"{v:,.1f}"  # the table's display format
    peak = re.search(r"training needs \*\*" + MIB + r"\*\* at its peak", text).group(1)
    assert peak == shown(table["training step peak (simulated) = required"])
    total = re.search(r"all were held at once, " + MIB, text).group(1)
    assert total == shown(table["training total (sum of the above)"])
    assert re.search(r"inference \*\*" + MIB, text).group(1) == shown(table["inference total"])
    notes = {n.y: n.text for n in bars.layout.annotations}
    assert notes["training"] == f"<b>{total}\u00a0MiB</b>"
    assert notes["inference"] == f"<b>{shown(table['inference total'])}\u00a0MiB</b>"
    # The training bar's segments add up to the table's training total, the inference bar's to its total.
    sums = [sum(t.x[i] for t in bars.data) for i in (0, 1)]
    assert sums[0] == pytest.approx(styler.data.set_index("component")["bytes"]["training total (sum of the above)"]
                                    / 2**20)
    assert sums[1] == pytest.approx(styler.data.set_index("component")["bytes"]["inference total"] / 2**20)
    assert "held together at the end of the forward pass" not in text
    assert not re.search(r"\d\.\d\d+\s*MiB", text)   # one rounding: one decimal everywhere


def test_bar_segments_name_the_table_rows_they_add_up(ctx):
    est = memory.estimate_memory(memory.ZooFactory("tutorial_net", 10), (3, 32, 32), 4, optimizer="sgd",
                                 precision="bf16")
    train, infer = tab_memory.bar_components(est)
    assert sum(train.values()) == est.training_total_bytes
    assert sum(infer.values()) == est.inference_total_bytes
    assert train["weights (parameters + buffers)" if est.buffer_bytes else "weights (parameters)"] == \
        est.param_bytes + est.buffer_bytes
    assert "activations (saved + half-precision weight copies + logits + loss)" in train


def _shown(component, value):
    """What the page's Dataframe receives: the display strings and the cell styles."""
    meta = component.postprocess(value).metadata
    return [c for row in meta["display_value"] for c in row], [c for row in meta["styling"] for c in row]


def test_numbers_do_not_wrap(tabs):
    ctx, mem_table = tabs.ctx, tabs.memory.w.table
    cells, styles = _shown(mem_table, _memory(ctx, "tutorial_net")[-1])
    assert "248,024" in cells and "0.2" in cells                   # parameters: bytes and MiB
    assert sum("white-space: nowrap" in s for s in styles) == 2 * len(cells) // 3   # bytes and MiB cells
    layers_out = tabs.model.w.layers
    params, layers = tab_model.ModelTab(ctx).layer_table({}, "resnet18", False, "none", 0, False, 0)
    assert "11,181,642 of 11,181,642 parameters trainable" in params
    cells, styles = _shown(layers_out, layers)
    assert "2,359,296" in cells                                    # a 3×3 512→512 conv
    assert any("white-space: nowrap" in s for s in styles)


def test_gradient_accumulation_raises_the_peak_and_says_why(ctx):
    """Issue 16: with accumulation the 2nd and later batches hold the gradients all step long."""
    calculate = tab_memory.MemoryTab(ctx).calculate
    one = calculate({}, "resnet18", False, "none", 0, 32, "sgd", "fp32", "8 GB", 0, 1, progress=lambda *a, **k: None)
    four = calculate({}, "resnet18", False, "none", 0, 32, "sgd", "fp32", "8 GB", 0, 4, progress=lambda *a, **k: None)
    peak = lambda text: float(text[0].split("training needs **")[1].split("\xa0MiB")[0].replace(",", ""))
    assert peak(four) > peak(one) * 1.05
    assert "batch 32 accumulated over 4 (the peak of the 2nd and later batches" in four[0]
    # The sentence says why the peak passes the bars' sum: backward's temporaries, not the optimiser.
    assert "backward frees saved activations" in one[0]
    assert "above it: the earlier batches' gradients are held from the start" in four[0]
    assert "backward makes temporaries" in four[0] and "optimiser step makes temporaries" not in four[0]
    for bad in (1.5, 10**9, float("inf")):
        with pytest.raises(gr.Error, match="Gradient accumulation must be a whole number"):
            calculate({}, "resnet18", False, "none", 0, 32, "sgd", "fp32", "8 GB", 0, bad, progress=lambda *a, **k: None)


def test_the_peak_sentence_names_the_phase_of_the_peak(ctx):
    """The tutorial Net's peak (batch 32) is above the bars' sum at the end of backward, not in
    the optimiser step, which SGD's for-loop runs in place; the sentence said 'optimiser' before."""
    est = memory.estimate_memory(memory.ZooFactory("tutorial_net", 10), (3, 32, 32), 32, target_device="cpu",
                                 inference=False)
    assert est.step_peak_bytes > est.training_total_bytes and est.peak_phase == "backward"
    text = tab_memory._peak_sentence(est)
    assert "above it: backward makes temporaries" in text and "optimiser" not in text
