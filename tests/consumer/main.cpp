// Uses dynattn through its installed package: builds a registered model and runs it.
#include <dynattn/dynattn.h>

#include <iostream>

int main() {
  auto model = dynattn::create_model("resnet20");
  model.module.ptr()->eval();
  auto y = model.forward(torch::randn({2, 1, 28, 28}));
  if (y.sizes() != torch::IntArrayRef({2, 10})) {
    std::cerr << "unexpected output shape " << y.sizes() << "\n";
    return 1;
  }
  std::cout << "consumer ok: dynattn " << dynattn::version() << ", "
            << dynattn::count_parameters(*model.module.ptr()) << " parameters\n";
  return 0;
}
