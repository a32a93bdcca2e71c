"""Builds an ONNX model the way another tool would, for the import test: a
logistic regression over telco columns, with Cerebro's conventions nowhere.

    make_external_onnx.py OUT.onnx [--external-data] [--width-unsaid]

With --external-data, the weights go to a file beside OUT.onnx that the
model refers to by name (ONNX's external data), which Cerebro refuses.
With --width-unsaid, the output is declared [N, W]: its width is known only
when the graph runs.

Inputs: "numbers", float [N, 2] (tenure, monthly_charges), and "contract",
string [N, 1]. Output "probabilities", float [N, 2]: [1 - p, p] with
p = sigmoid(-0.05 * tenure + 0.02 * monthly_charges - 0.8 * code(contract) - 0.3),
code = 0, 1, 2 for Month-to-month, One year, Two year (-1 otherwise).
"""
import os
import sys

import onnx
from onnx import TensorProto, helper, numpy_helper


def main():
    weights = helper.make_tensor("w", TensorProto.FLOAT, [2, 1], [-0.05, 0.02])
    contract_weight = helper.make_tensor("wc", TensorProto.FLOAT, [1], [-0.8])
    bias = helper.make_tensor("b", TensorProto.FLOAT, [1], [-0.3])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    nodes = [
        helper.make_node("MatMul", ["numbers", "w"], ["linear"]),
        helper.make_node(
            "CategoryMapper", ["contract"], ["code"], domain="ai.onnx.ml",
            cats_strings=["Month-to-month", "One year", "Two year"], cats_int64s=[0, 1, 2], default_int64=-1,
        ),
        helper.make_node("Cast", ["code"], ["code_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["code_f", "wc"], ["contract_term"]),
        helper.make_node("Add", ["linear", "contract_term"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p"]),
        helper.make_node("Sub", ["one", "p"], ["q"]),
        helper.make_node("Concat", ["q", "p"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "external_logistic_regression",
        [
            helper.make_tensor_value_info("numbers", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("contract", TensorProto.STRING, ["N", 1]),
        ],
        [helper.make_tensor_value_info(
            "probabilities", TensorProto.FLOAT, ["N", "W" if "--width-unsaid" in sys.argv[2:] else 2]
        )],
        initializer=[weights, contract_weight, bias, one],
    )
    model = helper.make_model(
        graph, producer_name="external-tool",
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    if "--external-data" in sys.argv[2:]:
        # Only raw_data moves out of the file: store the weights that way.
        for tensor in model.graph.initializer:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
        location = os.path.basename(sys.argv[1]) + ".data"
        onnx.save(model, sys.argv[1], save_as_external_data=True, all_tensors_to_one_file=True,
                  location=location, size_threshold=0)
    else:
        onnx.save(model, sys.argv[1])


if __name__ == "__main__":
    main()
