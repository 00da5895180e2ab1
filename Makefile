# Thin wrapper around CMake. `make` builds, `make test` sets up and runs every suite,
# `make run` runs the main app, `make bench` prints the benchmarks. SANITIZE=1 builds with
# AddressSanitizer + UBSan in its own build directory.
SANITIZE ?= 0
ifeq ($(SANITIZE),1)
BUILD ?= build-asan
CMAKE_FLAGS += -DFIBRIL_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug
else
BUILD ?= build
endif
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: all build deps test run bench clean

all: build

deps:
	@scripts/install-deps

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) $(CMAKE_FLAGS)

build: $(BUILD)/CMakeCache.txt
	@cmake --build $(BUILD) -j $(JOBS)

test: deps
	@$(MAKE) --no-print-directory build
	@BUILD=$(BUILD) SANITIZE=$(SANITIZE) scripts/run-tests

run: deps
	@$(MAKE) --no-print-directory build
	$(BUILD)/fibril run apps/hello

bench: deps
	@$(MAKE) --no-print-directory build
	@BUILD=$(BUILD) scripts/run-bench

clean:
	rm -rf build build-asan
