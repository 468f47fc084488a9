"""Stand-in ONNX files for the ``tiny`` profile: DWpose (YOLOX detector + RTMPose whole-body) and an
insightface pack (SCRFD detector + ArcFace recogniser).

Each file has the real model's input/output names, ranks and shapes, so rtmlib and insightface
load and run them through their normal code paths (routing, pre- and post-processing). The graphs
are small deterministic functions of the input, not trained networks:

* the YOLOX stand-in finds the letterboxed image content (pixels that are not the pad value 114)
  and reports one person box covering most of it, nudged toward the "salient" centroid (pixels far
  from the mean colour); a flat image gives no person;
* the RTMPose stand-in places the 133 COCO-WholeBody keypoints on a standing-person template
  inside the crop and moves every body joint (hands and face follow their wrist / nose) by an
  amount computed from pooled image content, with content-dependent confidences;
* the SCRFD stand-in reports one face near the centre-top of the image content, with the five
  landmarks of the ArcFace template, at every pyramid level (NMS keeps one);
* the ArcFace stand-in maps pooled, mean-removed pixels of the aligned 112x112 crop to 512-d
  through a fixed random projection, so different faces give different embeddings.

Graphs are built with ``onnx.helper`` (opset 18) from constants drawn from a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
IR_VERSION = 8

# COCO-WholeBody has 133 keypoints: 17 body, 6 feet, 68 face, 21 + 21 hands.
NUM_WHOLEBODY = 133
SIMCC_SPLIT = 2.0  # rtmlib decodes simcc bins / 2 -> input pixels
POSE_INPUT_HW = (384, 288)
DET_INPUT_HW = (640, 640)
ARCFACE_SIZE = 112
EMBED_DIM = 512


class _Graph:
    """A very small builder over onnx.helper: every op returns its (single) output name."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list = []
        self.inits: list = []
        self.n = 0

    def _name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}_{hint}_{self.n}"

    def const(self, value, dtype=np.float32, hint: str = "c") -> str:
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64, "i")

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or self._name(op_type.lower())
        # Node names deliberately do not start with "Sub"/"Mul": insightface reads that pattern
        # in the first nodes as an mxnet-style graph and would change its input normalisation.
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [out], name=f"n{self.n}_{op_type.lower()}",
                                  **attrs)
        )
        return out

    # shorthands
    def add(self, a, b, **kw):
        return self.op("Add", a, b, **kw)

    def sub(self, a, b, **kw):
        return self.op("Sub", a, b, **kw)

    def mul(self, a, b, **kw):
        return self.op("Mul", a, b, **kw)

    def div(self, a, b, **kw):
        return self.op("Div", a, b, **kw)

    def reduce(self, kind: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        return self.op(f"Reduce{kind}", x, self.ints(*axes), keepdims=keepdims)

    def scalar(self, v: float) -> str:
        return self.const(np.float32(v), hint="s")

    def save(self, path: Path, inputs: list, outputs: list, doc: str) -> Path:
        graph = helper.make_graph(self.nodes, self.prefix, inputs, outputs, self.inits)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="dwm.shared.tiny.onnx",
            doc_string=doc,
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
        return path


def _tensor(name: str, shape: list) -> object:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _content_stats(g: _Graph, x: str, pad_value: float, tol: float, pool: int = 4):
    """Extent of the non-pad content of NCHW ``x`` (batch 1) and its salient centroid.

    Works on a ``pool``x``pool`` average-pooled copy (16x fewer pixels; a block that mixes pad
    and content counts as content). Returns graph names of float scalars, in input pixels:
    x0, y0, x1, y1 (content box, exclusive right/bottom), cx_sal, cy_sal (centroid of pixels far
    from the content's mean colour), and sal (mean distance from the mean colour, input units).
    """
    xp = g.op("AveragePool", x, kernel_shape=[pool, pool], strides=[pool, pool])
    shape = g.op("Shape", xp)
    h = g.op("Cast", g.op("Squeeze", g.op("Gather", shape, g.ints(2), axis=0), g.ints(0)), to=1)
    w = g.op("Cast", g.op("Squeeze", g.op("Gather", shape, g.ints(3), axis=0), g.ints(0)), to=1)
    dev = g.op("Abs", g.sub(xp, g.scalar(pad_value)))
    mask = g.op("Cast", g.op("Greater", g.reduce("Max", dev, [1], 0), g.scalar(tol)),
                to=1)  # [1,h,w] float
    idx_x = g.op("Range", g.scalar(0.0), w, g.scalar(1.0))  # [w]
    idx_y = g.op("Range", g.scalar(0.0), h, g.scalar(1.0))  # [h]
    col = g.reduce("Max", mask, [1], 0)  # [1,w]: columns that hold content
    row = g.reduce("Max", mask, [2], 0)  # [1,h]
    x1 = g.reduce("Max", g.mul(col, g.add(idx_x, g.scalar(1.0))), [0, 1], 0)
    x0 = g.sub(w, g.reduce("Max", g.mul(col, g.sub(w, idx_x)), [0, 1], 0))
    y1 = g.reduce("Max", g.mul(row, g.add(idx_y, g.scalar(1.0))), [0, 1], 0)
    y0 = g.sub(h, g.reduce("Max", g.mul(row, g.sub(h, idx_y)), [0, 1], 0))
    # mean colour of the content, then per-pixel distance from it (a crude saliency map)
    m4 = g.op("Unsqueeze", mask, g.ints(1))  # [1,1,h,w]
    area = g.op("Max", g.reduce("Sum", m4, [0, 1, 2, 3], 0), g.scalar(1.0))
    mean_c = g.div(g.reduce("Sum", g.mul(xp, m4), [2, 3], 1), area)  # [1,3,1,1]
    sal_map = g.mul(g.reduce("Sum", g.op("Abs", g.sub(xp, mean_c)), [1], 0), mask)  # [1,h,w]
    sal_sum = g.add(g.reduce("Sum", sal_map, [0, 1, 2], 0), g.scalar(1e-6))
    sal = g.div(sal_sum, area)
    sx = g.reduce("Sum", sal_map, [1], 0)  # [1,w]
    sy = g.reduce("Sum", sal_map, [2], 0)  # [1,h]
    cx_sal = g.div(g.reduce("Sum", g.mul(sx, g.add(idx_x, g.scalar(0.5))), [0, 1], 0), sal_sum)
    cy_sal = g.div(g.reduce("Sum", g.mul(sy, g.add(idx_y, g.scalar(0.5))), [0, 1], 0), sal_sum)
    k = g.scalar(float(pool))
    return (g.mul(x0, k), g.mul(y0, k), g.mul(x1, k), g.mul(y1, k), g.mul(cx_sal, k),
            g.mul(cy_sal, k), sal)


# ----------------------------------------------------------------------------------------------
# DWpose: YOLOX-l person detector (rtmlib.YOLOX, output without NMS: 1 x 8400 x 85)
# ----------------------------------------------------------------------------------------------
def build_yolox(path: Path) -> Path:
    H, W = DET_INPUT_HW
    strides = [8, 16, 32]
    grids, strides_col, fire = [], [], []
    for s in strides:
        gy, gx = np.mgrid[: H // s, : W // s]
        grids.append(np.stack([gx, gy], -1).reshape(-1, 2))
        strides_col.append(np.full((grids[-1].shape[0], 1), s))
        fire.append(np.zeros((grids[-1].shape[0], 1)))
    grids = np.concatenate(grids)[None].astype(np.float32)  # [1,8400,2]
    strides_col = np.concatenate(strides_col)[None].astype(np.float32)
    fire = np.concatenate(fire)[None].astype(np.float32)
    fire[0, -(H // 32) * (W // 32), 0] = 1.0  # one P5 anchor reports: NMS has nothing to merge
    n = grids.shape[1]

    g = _Graph("yolox_standin")
    x = "images"
    x0, y0, x1, y1, cxs, cys, sal = _content_stats(g, x, 114.0, 0.01)
    cw = g.op("Max", g.sub(x1, x0), g.scalar(1.0))
    ch = g.op("Max", g.sub(y1, y0), g.scalar(1.0))
    mid_x = g.mul(g.add(x0, x1), g.scalar(0.5))
    mid_y = g.mul(g.add(y0, y1), g.scalar(0.5))
    # box centre: the content centre pulled 20% toward the salient centroid (follows the dancer)
    cx = g.add(mid_x, g.mul(g.sub(cxs, mid_x), g.scalar(0.2)))
    cy = g.add(mid_y, g.mul(g.sub(cys, mid_y), g.scalar(0.1)))
    bw = g.mul(cw, g.scalar(0.9))
    bh = g.mul(ch, g.scalar(0.94))
    centre = g.op("Reshape", g.op("Concat", g.op("Reshape", cx, g.ints(1)),
                                  g.op("Reshape", cy, g.ints(1)), axis=0), g.ints(1, 1, 2))
    size = g.op("Reshape", g.op("Concat", g.op("Reshape", bw, g.ints(1)),
                                g.op("Reshape", bh, g.ints(1)), axis=0), g.ints(1, 1, 2))
    st = g.const(strides_col)
    xy = g.sub(g.div(centre, st), g.const(grids))  # rtmlib: (xy + grid) * stride
    wh = g.op("Log", g.div(size, st))  # rtmlib: exp(wh) * stride
    # objectness: high for an image with content, ~0 for a flat one
    obj = g.mul(g.op("Sigmoid", g.mul(g.sub(sal, g.scalar(4.0)), g.scalar(2.0))), g.scalar(0.93))
    obj_col = g.mul(g.const(fire), obj)  # [1,8400,1]
    cls = np.zeros((1, 1, 80), np.float32)
    cls[..., 0] = 1.0  # person
    cls_all = g.op("Expand", g.const(cls), g.ints(1, n, 80))
    g.op("Concat", xy, wh, obj_col, cls_all, axis=2, out="output")
    return g.save(path, [_tensor("images", [1, 3, H, W])], [_tensor("output", [1, n, 85])],
                  "stand-in for DWPose yolox_l.onnx (1x3x640x640 -> 1x8400x85)")


# ----------------------------------------------------------------------------------------------
# DWpose: RTMPose whole-body (dw-ll_ucoco_384.onnx: 1x3x384x288 -> simcc 1x133x576, 1x133x768)
# ----------------------------------------------------------------------------------------------
_BODY = [  # COCO 17 in crop-normalised (x, y); "left" is the person's left (image right)
    (0.50, 0.16), (0.52, 0.145), (0.48, 0.145), (0.545, 0.155), (0.455, 0.155),
    (0.60, 0.26), (0.40, 0.26), (0.64, 0.39), (0.36, 0.39), (0.66, 0.51), (0.34, 0.51),
    (0.57, 0.53), (0.43, 0.53), (0.58, 0.69), (0.42, 0.69), (0.58, 0.85), (0.42, 0.85),
]
_FEET = [(0.60, 0.875), (0.615, 0.87), (0.57, 0.865), (0.40, 0.875), (0.385, 0.87), (0.43, 0.865)]


def _wholebody_template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(133x2 template, 133x17 parent matrix, 133 confidence logits)."""
    pts = list(_BODY) + list(_FEET)
    parent = list(range(17)) + [15, 15, 15, 16, 16, 16]
    nose = np.array(_BODY[0])
    # face (68): jaw arc, brows, nose line, eyes, mouth, all within a ~0.07-wide face
    face = []
    for t in np.linspace(np.pi, 0, 17):  # jaw, from the image-left ear around the chin
        face.append(nose + [0.035 * np.cos(t), 0.02 + 0.03 * np.sin(t) * 1.0 - 0.01])
    for t in np.linspace(-0.03, -0.006, 5):
        face.append(nose + [t, -0.03])
    for t in np.linspace(0.006, 0.03, 5):
        face.append(nose + [t, -0.03])
    for t in np.linspace(-0.02, 0.0, 4):
        face.append(nose + [0.0, t])
    for t in np.linspace(-0.01, 0.01, 5):
        face.append(nose + [t, 0.005])
    for cxe in (-0.018, 0.018):
        for a in np.linspace(0, 2 * np.pi, 6, endpoint=False):
            face.append(nose + [cxe + 0.007 * np.cos(a), -0.015 + 0.003 * np.sin(a)])
    for a in np.linspace(0, 2 * np.pi, 12, endpoint=False):
        face.append(nose + [0.015 * np.cos(a), 0.02 + 0.006 * np.sin(a)])
    for a in np.linspace(0, 2 * np.pi, 8, endpoint=False):
        face.append(nose + [0.01 * np.cos(a), 0.02 + 0.003 * np.sin(a)])
    assert len(face) == 68
    pts += [tuple(p) for p in face]
    parent += [0] * 68
    # hands (21 each): wrist + 5 fingers x 4 joints fanning down from the wrist
    for wrist_idx in (9, 10):  # left hand, then right hand
        wx, wy = _BODY[wrist_idx]
        side = 1.0 if wrist_idx == 9 else -1.0
        pts.append((wx, wy))
        for f in range(5):
            ang = np.deg2rad(60 + 15 * f) if side > 0 else np.deg2rad(120 - 15 * f)
            for j in range(1, 5):
                r = 0.012 * j
                pts.append((wx + r * np.cos(ang) * side * side, wy + r * np.sin(ang)))
        parent += [wrist_idx] * 21
    tmpl = np.asarray(pts, np.float32)
    assert tmpl.shape == (NUM_WHOLEBODY, 2)
    par = np.zeros((NUM_WHOLEBODY, 17), np.float32)
    par[np.arange(NUM_WHOLEBODY), parent] = 1.0
    logits = np.array([2.6] * 17 + [1.6] * 6 + [1.3] * 68 + [1.0] * 42, np.float32)
    return tmpl, par, logits


def build_rtmpose(path: Path, seed: int = 1) -> Path:
    H, W = POSE_INPUT_HW
    wx, wy = int(W * SIMCC_SPLIT), int(H * SIMCC_SPLIT)
    rng = np.random.RandomState(seed)
    tmpl, par, logits = _wholebody_template()
    nfeat = 3 * 8 * 6
    g = _Graph("rtmpose_standin")
    pooled = g.op("AveragePool", "input", kernel_shape=[48, 48], strides=[48, 48])  # [1,3,8,6]
    f = g.op("Flatten", pooled, axis=1)  # [1,144], input is mean/std normalised (~N(0,1))
    # joint motion: 17 body joints move by up to ~8% of the crop, driven by image content
    joint = g.op("Tanh", g.op("MatMul", f, g.const(rng.randn(nfeat, 34) * 0.15)))
    joint = g.op("Reshape", g.mul(joint, g.scalar(0.08)), g.ints(1, 17, 2))
    moved = g.op("MatMul", g.const(par), joint)  # [1,133,2]: hands/face follow wrist/nose
    own = g.op("Tanh", g.op("MatMul", f, g.const(rng.randn(nfeat, 2 * NUM_WHOLEBODY) * 0.1)))
    own = g.op("Reshape", g.mul(own, g.scalar(0.006)), g.ints(1, NUM_WHOLEBODY, 2))
    kp = g.add(g.add(g.const(tmpl[None]), moved), own)
    kp = g.op("Clip", kp, g.scalar(0.0), g.scalar(0.999))
    conf_w = g.const(rng.randn(nfeat, NUM_WHOLEBODY) * 0.05)
    conf = g.op("Sigmoid", g.add(g.const(logits[None]), g.op("MatMul", f, conf_w)))
    conf = g.op("Unsqueeze", conf, g.ints(2))  # [1,133,1]
    sigma = 4.0  # bins

    def simcc(axis: int, nbins: int, out: str) -> str:
        pos = g.op("Gather", kp, g.ints(axis), axis=2)  # [1,133,1] normalised
        pos = g.mul(pos, g.scalar(float(nbins)))
        bins = g.const(np.arange(nbins, dtype=np.float32)[None, None] + 0.0)
        d = g.sub(bins, pos)
        gauss = g.op("Exp", g.mul(g.mul(d, d), g.scalar(-0.5 / sigma**2)))
        return g.mul(gauss, conf, out=out)

    simcc(0, wx, "simcc_x")
    simcc(1, wy, "simcc_y")
    return g.save(
        path,
        [_tensor("input", [1, 3, H, W])],
        [_tensor("simcc_x", [1, NUM_WHOLEBODY, wx]), _tensor("simcc_y", [1, NUM_WHOLEBODY, wy])],
        "stand-in for DWPose dw-ll_ucoco_384.onnx (1x3x384x288 -> simcc 576 / 768 bins)",
    )


# ----------------------------------------------------------------------------------------------
# insightface: SCRFD detector with keypoints (9 outputs: 3 strides x score, bbox, kps)
# ----------------------------------------------------------------------------------------------
# ArcFace's 112x112 alignment template as fractions of a square face box
_FACE5 = np.array([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37],
                   [70.73, 92.20]], np.float32) / 112.0


def build_scrfd(path: Path) -> Path:
    g = _Graph("scrfd_standin")
    x = "input.1"
    shape = g.op("Shape", x)
    h_i = g.op("Gather", shape, g.ints(2), axis=0)  # [1] int64
    w_i = g.op("Gather", shape, g.ints(3), axis=0)
    # insightface pads with zeros, then normalises (x - 127.5) / 128
    x0, y0, x1, y1, cxs, cys, sal = _content_stats(g, x, -127.5 / 128.0, 1e-4)
    cw = g.op("Max", g.sub(x1, x0), g.scalar(1.0))
    ch = g.op("Max", g.sub(y1, y0), g.scalar(1.0))
    mid_x = g.mul(g.add(x0, x1), g.scalar(0.5))
    # face: near the centre-top of the content, pulled a little toward the salient centroid.
    # A square-ish picture is taken as a portrait (big face, a bit above the middle), a tall one
    # as a full-body shot (small face near the top); in between is interpolated.
    tall = g.op("Clip", g.div(g.sub(g.div(ch, cw), g.scalar(1.0)), g.scalar(0.78)),
                g.scalar(0.0), g.scalar(1.0))
    fcx = g.add(mid_x, g.mul(g.sub(cxs, mid_x), g.scalar(0.25)))
    fcy = g.add(y0, g.mul(ch, g.sub(g.scalar(0.42), g.mul(tall, g.scalar(0.25)))))
    side = g.mul(cw, g.sub(g.scalar(0.5), g.mul(tall, g.scalar(0.36))))
    half = g.mul(side, g.scalar(0.5))
    bx0, by0 = g.sub(fcx, half), g.sub(fcy, half)
    bx1, by1 = g.add(fcx, half), g.add(fcy, half)
    peak = g.mul(g.op("Sigmoid", g.mul(g.sub(sal, g.scalar(0.03)), g.scalar(200.0))),
                 g.scalar(0.9))
    scores, boxes, kpss = [], [], []
    for stride in (8, 16, 32):
        s_i = g.ints(stride)
        hs = g.op("Div", h_i, s_i)
        ws = g.op("Div", w_i, s_i)
        hw = g.op("Concat", hs, ws, axis=0)  # [2] int64
        ax = g.mul(g.op("Cast", g.op("Range", g.const(np.int64(0), np.int64),
                                     g.op("Squeeze", ws, g.ints(0)),
                                     g.const(np.int64(1), np.int64)), to=1),
                   g.scalar(float(stride)))
        ay = g.mul(g.op("Cast", g.op("Range", g.const(np.int64(0), np.int64),
                                     g.op("Squeeze", hs, g.ints(0)),
                                     g.const(np.int64(1), np.int64)), to=1),
                   g.scalar(float(stride)))
        AX = g.op("Expand", g.op("Unsqueeze", ax, g.ints(0)), hw)  # [Hs,Ws]
        AY = g.op("Expand", g.op("Unsqueeze", ay, g.ints(1)), hw)
        dx, dy = g.sub(AX, fcx), g.sub(AY, fcy)
        d2 = g.add(g.mul(dx, dx), g.mul(dy, dy))
        score = g.mul(g.op("Exp", g.mul(d2, g.scalar(-0.5 / float(stride) ** 2))), peak)
        inv = g.scalar(1.0 / stride)
        parts = [g.sub(AX, bx0), g.sub(AY, by0), g.sub(bx1, AX), g.sub(by1, AY)]
        bbox = [g.mul(p, inv) for p in parts]
        kp = []
        for fx, fy in _FACE5:
            kx = g.add(bx0, g.mul(side, g.scalar(float(fx))))
            ky = g.add(by0, g.mul(side, g.scalar(float(fy))))
            kp += [g.mul(g.sub(kx, AX), inv), g.mul(g.sub(ky, AY), inv)]

        def per_anchor(chans: list[str], c: int, out: str) -> str:
            # [Hs,Ws,C] -> two anchors per location -> [Hs*Ws*2, C] (insightface's order)
            stacked = g.op("Concat", *[g.op("Unsqueeze", t, g.ints(2)) for t in chans], axis=2)
            two = g.op("Expand", g.op("Unsqueeze", stacked, g.ints(2)),
                       g.op("Concat", hw, g.ints(2, c), axis=0))
            return g.op("Reshape", two, g.ints(-1, c), out=out)

        scores.append(per_anchor([score], 1, f"score_{stride}"))
        boxes.append(per_anchor(bbox, 4, f"bbox_{stride}"))
        kpss.append(per_anchor(kp, 10, f"kps_{stride}"))
    outs = ([_tensor(f"score_{s}", [f"n{s}", 1]) for s in (8, 16, 32)]
            + [_tensor(f"bbox_{s}", [f"n{s}", 4]) for s in (8, 16, 32)]
            + [_tensor(f"kps_{s}", [f"n{s}", 10]) for s in (8, 16, 32)])
    return g.save(path, [_tensor(x, [1, 3, "height", "width"])], outs,
                  "stand-in for SCRFD-10G with keypoints (dynamic input, 9 outputs)")


def build_arcface(path: Path, seed: int = 2) -> Path:
    rng = np.random.RandomState(seed)
    g = _Graph("arcface_standin")
    nfeat = 3 * 8 * 8
    pooled = g.op("AveragePool", "input.1", kernel_shape=[14, 14], strides=[14, 14])
    f = g.op("Flatten", pooled, axis=1)  # [B,192]
    f = g.sub(f, g.reduce("Mean", f, [1], 1))  # brightness does not dominate the identity
    proj = rng.randn(nfeat, EMBED_DIM).astype(np.float32) / np.sqrt(nfeat) * 8.0
    g.op("MatMul", f, g.const(proj), out="embedding")
    return g.save(path, [_tensor("input.1", ["batch", 3, ARCFACE_SIZE, ARCFACE_SIZE])],
                  [_tensor("embedding", ["batch", EMBED_DIM])],
                  "stand-in for an ArcFace recogniser (1x3x112x112 -> 512)")


# insightface pack layouts (file names as in the real packs; insightface routes by shapes)
PACK_FILES = {
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
}


def build_all(root: Path) -> dict[str, Path]:
    """Write every stand-in under ``root``: dwpose/ and insightface/models/<pack>/."""
    root = Path(root)
    out = {
        "dwpose_det": build_yolox(root / "dwpose" / "yolox_l.onnx"),
        "dwpose_pose": build_rtmpose(root / "dwpose" / "dw-ll_ucoco_384.onnx"),
    }
    for pack, (det, rec) in PACK_FILES.items():
        pack_dir = root / "insightface" / "models" / pack
        out[f"{pack}_det"] = build_scrfd(pack_dir / det)
        out[f"{pack}_rec"] = build_arcface(pack_dir / rec)
    return out
