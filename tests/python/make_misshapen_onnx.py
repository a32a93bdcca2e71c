"""Builds an ONNX regression whose output does not match its rows, though
it declares that it does: ONNX Runtime does not hold a graph to the shapes
it declares. For the test that such a graph fails with its shape, not a
panic in cerebrod or a protocol error in the backend.

    make_misshapen_onnx.py OUT.onnx

Input "x", float [N, 1]; output "y", declared float [N, 1], computed as x
with one more row of 0 below it: N + 1 values for N rows.
"""
import sys

import onnx
from onnx import TensorProto, helper


def main():
    graph = helper.make_graph(
        [helper.make_node("Concat", ["x", "extra"], ["y"], axis=0)],
        "one_row_too_many",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        initializer=[helper.make_tensor("extra", TensorProto.FLOAT, [1, 1], [0.0])],
    )
    model = helper.make_model(graph, producer_name="misshapen", opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, sys.argv[1])


if __name__ == "__main__":
    main()
