#include <cstdio>
int main() { std::puts("dynattn"); return 0; }
