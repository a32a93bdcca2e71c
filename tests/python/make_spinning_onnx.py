"""Builds an ONNX model that spins: a regression over one float column whose
graph adds zero to its input in a Loop of ITERATIONS trips. Imported, it
stands for a hostile (or careless) graph that takes as long as its author
likes, for the test that cerebrod stops a run past its scoring deadline.

    make_spinning_onnx.py OUT.onnx ITERATIONS

Input "x", float [N, 1]; output "y", float [N, 1] (y = x).
"""
import sys

import onnx
from onnx import TensorProto, helper


def main():
    out, iterations = sys.argv[1], int(sys.argv[2])
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["keep_going"], ["keep_going_out"]),
            helper.make_node("Add", ["acc", "zero"], ["acc_out"]),
        ],
        "spin_body",
        [
            helper.make_tensor_value_info("trip", TensorProto.INT64, []),
            helper.make_tensor_value_info("keep_going", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("keep_going_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1]),
        ],
        initializer=[helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["trips", "always", "start"], ["spun"], body=body),
            helper.make_node("Add", ["x", "spun"], ["y"]),
        ],
        "spinning_regression",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        initializer=[
            helper.make_tensor("trips", TensorProto.INT64, [], [iterations]),
            helper.make_tensor("always", TensorProto.BOOL, [], [True]),
            helper.make_tensor("start", TensorProto.FLOAT, [1], [0.0]),
        ],
    )
    model = helper.make_model(graph, producer_name="spinner", opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, out)


if __name__ == "__main__":
    main()
