// Size programs of the GPU launchers: a kernel's grid and workspace sizes as functions of its
// operands' sizes, written by the Python side (runtime/cuda.py's postfix) as postfix words:
//   0 v      push v
//   1 a d    push size(operand a, dim d)
//   2..8     pop b, pop a, push a + b, a - b, a * b, ceil(a / b), a / b, min(a, b), max(a, b)
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace xattn {

inline int64_t evaluate_size_program(const std::vector<int64_t>& program, const std::vector<at::Tensor>& operands,
                                     const char* who) {
  std::vector<int64_t> stack;
  for (size_t i = 0; i < program.size();) {
    const int64_t op = program[i++];
    if (op == 0) {
      stack.push_back(program[i++]);
      continue;
    }
    if (op == 1) {
      const int64_t arg = program[i++], dim = program[i++];
      stack.push_back(operands.at(arg).size(dim));
      continue;
    }
    TORCH_CHECK(stack.size() >= 2, "torch_xegpu_attn (", who, "): malformed size program");
    const int64_t b = stack.back();
    stack.pop_back();
    const int64_t a = stack.back();
    stack.pop_back();
    switch (op) {
      case 2: stack.push_back(a + b); break;
      case 3: stack.push_back(a - b); break;
      case 4: stack.push_back(a * b); break;
      case 5: stack.push_back((a + b - 1) / b); break;
      case 6: stack.push_back(a / b); break;
      case 7: stack.push_back(std::min(a, b)); break;
      case 8: stack.push_back(std::max(a, b)); break;
      default: TORCH_CHECK(false, "torch_xegpu_attn (", who, "): unknown size operation ", op);
    }
  }
  TORCH_CHECK(stack.size() == 1, "torch_xegpu_attn (", who, "): malformed size program");
  return stack[0];
}

}  // namespace xattn
