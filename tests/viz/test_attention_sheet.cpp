#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "dynattn/viz/attention_sheet.h"
#include "test_util.h"

using namespace dynattn;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;

TEST(AttentionSheet, JetColormapEndpointsAndMiddle) {
  const auto c = jet_colormap(torch::tensor({0.0f, 0.5f, 1.0f, -3.0f}));
  // 0: dark blue, 0.5: green, 1: dark red; out-of-range values clamp.
  EXPECT_EQ(c[0][2].item<int>(), 128);
  EXPECT_EQ(c[0][0].item<int>(), 0);
  EXPECT_EQ(c[1][1].item<int>(), 255);
  EXPECT_EQ(c[2][0].item<int>(), 128);
  EXPECT_EQ(c[2][2].item<int>(), 0);
  EXPECT_TRUE(c[3].equal(c[0]));
}

TEST(AttentionSheet, DisplayMapsFromSpatialMapsAndAffinities) {
  auto spatial = torch::rand({2, 1, 7, 7});
  const auto s = spatial_map_for_display(spatial);
  ASSERT_EQ(s.sizes(), torch::IntArrayRef({2, 7, 7}));
  EXPECT_FLOAT_EQ(s[0].min().item<float>(), 0.0f);
  EXPECT_FLOAT_EQ(s[1].max().item<float>(), 1.0f);
  // An affinity [N,Q,K] shows the row of query 0 on its square key grid.
  auto affinity = torch::zeros({1, 3, 16});
  affinity[0][0][5] = 1.0;
  const auto a = spatial_map_for_display(affinity);
  ASSERT_EQ(a.sizes(), torch::IntArrayRef({1, 4, 4}));
  EXPECT_EQ(a[0][1][1].item<float>(), 1.0f);
  EXPECT_EQ(a.sum().item<float>(), 1.0f);
  EXPECT_FALSE(spatial_map_for_display(torch::zeros({1, 3, 15})).defined()) << "not square";
  EXPECT_FALSE(spatial_map_for_display(torch::zeros({1, 8, 1, 1})).defined()) << "a channel gate";
}

TEST(AttentionSheet, LayoutImageColumnThenMaps) {
  auto images = torch::zeros({2, 1, 3, 3});
  images[0][0][1][1] = 1.0;  // a bright centre pixel in image 0
  auto map = torch::zeros({2, 3, 3});
  const auto sheet =
      attention_sheet(images, {{"m", map}}, AttentionSheetOptions().scale(2).border(1).alpha(0.5));
  // 2 rows of 6-pixel cells and 2 columns, with 1-pixel borders.
  ASSERT_EQ(sheet.sizes(), torch::IntArrayRef({2 * 7 + 1, 2 * 7 + 1, 3}));
  EXPECT_EQ(sheet[0][0][0].item<int>(), 255) << "border";
  EXPECT_EQ(sheet[1 + 2][1 + 2][0].item<int>(), 255) << "centre pixel of image 0, upscaled";
  EXPECT_EQ(sheet[1][1][0].item<int>(), 0) << "dark corner of image 0";
  // The map column: a zero map is dark blue (0,0,128) blended half with the grey image.
  const auto corner = sheet[1][1 + 7];
  EXPECT_EQ(corner[0].item<int>(), 0);
  EXPECT_EQ(corner[2].item<int>(), 64);
  EXPECT_THAT(error_of([&] {
                attention_sheet(images, {{"bad", torch::zeros({3, 3, 3})}});
              }),
              HasSubstr("map 'bad' must be [N,h,w] with N=2"));
  EXPECT_THAT(error_of([&] {
                attention_sheet(torch::zeros({2, 3, 3}), {});
              }),
              HasSubstr("expected images [N,1,H,W]"));
}
