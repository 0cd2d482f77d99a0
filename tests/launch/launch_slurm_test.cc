// placeholder
#include <gtest/gtest.h>
TEST(Slurm, Placeholder) {}
