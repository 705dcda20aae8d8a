"""densenet.analysis.reuse (`densenet reuse`, Figure 5): the figure names the trained network, warns when
it was barely trained, and its panels do not overlap."""
from __future__ import annotations

import densenet

from helpers import run_main


def test_reuse_names_the_trained_network_and_warns_when_barely_trained(digits_run, tmp_path, capsys):
    code, out, err = run_main(capsys, "reuse", digits_run, "--out", tmp_path / "reuse.png")
    assert code == 0 and (tmp_path / "reuse.png").is_file()
    assert "warning: this checkpoint was saved after 1 epoch" in err and "initialisation" in err
    from densenet.analysis.reuse import network_name

    assert network_name(densenet.create_model("densenet_bc_100_k12", depth=40)) == "DenseNet-BC (L=40, k=12)"
    assert network_name(densenet.create_model("densenet_40_k12")) == "DenseNet (L=40, k=12)"
    assert network_name(densenet.create_model("densenet121")) == "DenseNet-BC (L=121, k=32)"
    assert network_name(densenet.create_model("densenet_bc_100_k12", compression=1.0)) == "DenseNet-B (L=100, k=12)"


def test_reuse_figure_panels_do_not_overlap_and_the_framed_column_says_how_it_is_scaled():
    from densenet.analysis.reuse import feature_reuse, network_name, reuse_figure

    model = densenet.create_model("densenet_bc_100_k12", depth=40)
    fig = reuse_figure(feature_reuse(model), f"Feature reuse: {network_name(model)}")
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"][:3]
    assert len(axes) == 3
    for left, right in zip(axes, axes[1:]):
        frame = left.get_window_extent(r)
        for artist in [right.yaxis.label, *right.get_yticklabels()]:
            box = artist.get_window_extent(r)
            assert box.x1 < frame.x0 or box.x0 > frame.x1 or not artist.get_text(), artist.get_text()
    texts = [t.get_text() for t in fig.texts]
    assert any("scaled to its own maximum" in t for t in texts)
    assert fig._suptitle.get_text() == "Feature reuse: DenseNet-BC (L=40, k=12)"
