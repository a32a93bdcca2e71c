"""Scores rows with a Cerebro ONNX export in the onnxruntime Python package,
as a user outside the database would. Used by the end-to-end suite.

    score_onnx.py MODEL.onnx ROWS.json KEY_COLUMN  ->  "key,score" lines

ROWS.json is a JSON array of row objects (SELECT json_agg(t) FROM t). Each
graph input is a [N, 1] tensor named after its column: float32 with NaN for
NULL, or strings with Cerebro's NULL marker for NULL. The score is the
positive-class probability (binary), the top class's (multiclass), or the
value (regression).
"""
import json
import sys

import numpy as np
import onnxruntime as ort

NULL_CATEGORY = "\x01NULL"


def column(rows, name, kind):
    values = [row.get(name) for row in rows]
    if kind == "tensor(string)":
        return np.array([[NULL_CATEGORY if v is None else str(v)] for v in values], dtype=object)
    return np.array([[np.nan if v is None else float(v)] for v in values], dtype=np.float32)


def main():
    model, rows_path, key = sys.argv[1:4]
    rows = json.load(open(rows_path))
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feed = {i.name: column(rows, i.name, i.type) for i in session.get_inputs()}
    outputs = {o.name: v for o, v in zip(session.get_outputs(), session.run(None, feed))}
    if "probability" in outputs:
        scores = outputs["probability"][:, 0]
    elif "probabilities" in outputs:
        scores = outputs["probabilities"].max(axis=1)
    else:
        scores = outputs["value"][:, 0]
    out = sys.stdout
    for row, score in zip(rows, scores):
        out.write(f"{row[key]},{float(score)!r}\n")


if __name__ == "__main__":
    main()
