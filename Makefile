# dynattn: the two commands (make demo, make test) and friends. Every target runs the set-up
# (Debian packages, idempotent) and the build first.
BUILD_DIR ?= build
JOBS ?= $(shell nproc)
PREFIX ?= /usr/local
CMAKE_FLAGS ?= -DCMAKE_BUILD_TYPE=Release

.PHONY: all deps configure build build-cli demo test test-fast bench install format clean

all: build

deps:
	@bash scripts/install-deps.sh

# Ninja for new build directories: with a precompiled header, CMake's Makefile generator lists
# every source's PCH flags in one flags.make, so adding a source file recompiled every object
# (~13 s each here); Ninja rebuilds only what changed. An existing build directory keeps the
# generator it was made with.
GENERATOR = $(if $(wildcard $(BUILD_DIR)/CMakeCache.txt),,-G Ninja)

configure: deps
	@cmake -S . -B $(BUILD_DIR) $(GENERATOR) $(CMAKE_FLAGS) > $(BUILD_DIR).configure.log 2>&1 || \
	  { cat $(BUILD_DIR).configure.log; exit 1; }

build: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS)

# Only the library and the CLI: what the demo needs, without tests and benchmarks.
build-cli: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS) --target dynattn_cli

# The main job: train ResNet-20 on a short schedule, print accuracy, parameters, MACs, speed.
demo: build-cli
	@$(BUILD_DIR)/dynattn demo

# Every test (unit, CLI, installed-package consumer). ctest runs tests in parallel, each with
# OMP_NUM_THREADS=1 (tests/CMakeLists.txt) so they never oversubscribe the cores.
test: build
	@cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS) --timeout 900

# Everything but the tests labelled slow.
test-fast: build
	@cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS) -LE slow

bench: build
	@$(BUILD_DIR)/dynattn bench --model resnet20 --batch 1,64 --channels-last --compare-malloc
	@$(BUILD_DIR)/bench/dynattn_bench --benchmark_min_time=0.5

install: build
	@cmake --install $(BUILD_DIR) --prefix $(PREFIX)

format:
	@clang-format -i $$(git ls-files '*.cpp' '*.h')

clean:
	@rm -rf $(BUILD_DIR) $(BUILD_DIR).configure.log
