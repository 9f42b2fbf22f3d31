// The channel attention modules inside the CIFAR ResNet's slots: built from specs, their maps
// reported under the block paths, and a training step through them (the block adds the
// shortcut in place onto the attention output, which autograd must allow).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "dynattn/models/cifar_resnet.h"

using namespace dynattn;

TEST(ChannelAttentionInResNet, MapsAndTrainingStepForEveryType) {
  for (const std::string spec : {"se:r=8", "eca", "cbam:r=8,kernel=3", "bam:r=8"}) {
    torch::manual_seed(0);
    CifarResNet net(
        CifarResNetOptions().depth(8).attention(spec).stage_attention("bam").zero_init_last(false));
    auto x = torch::randn({3, 1, 28, 28});
    net->train();
    auto logits = net->forward(x);
    ASSERT_EQ(logits.sizes(), torch::IntArrayRef({3, 10})) << spec;
    logits.sum().backward();
    for (const auto& p : net->named_parameters()) {
      if (p.key().find(".attn.") == std::string::npos) continue;
      ASSERT_TRUE(p.value().grad().defined()) << spec << " " << p.key();
    }
    net->eval();
    auto r = net->forward_with_maps(x);
    EXPECT_TRUE(torch::allclose(r.output, net->forward(x), 1e-5, 1e-6)) << spec;
    const std::string name = spec.substr(0, spec.find(':'));
    const std::string first_map = name == "se" || name == "eca" ? "gate" : "channel";
    ASSERT_TRUE(r.maps.count("layer1.0.attn." + first_map)) << spec;
    EXPECT_EQ(r.maps.at("layer3.0.attn." + first_map).size(1), 64) << spec;
    ASSERT_TRUE(r.maps.count("stage_attn1.attention"));
    EXPECT_EQ(r.maps.at("stage_attn2.attention").sizes(), torch::IntArrayRef({3, 32, 14, 14}));
  }
}
