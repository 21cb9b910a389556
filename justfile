# Every task a person or CI runs. `just --list` explains them.

set shell := ["bash", "-euo", "pipefail", "-c"]

cache := env_var_or_default("SLIPWAY_CACHE_DIR", env_var("HOME") + "/.cache/slipway")
export SLIPWAY_CACHE_DIR := cache
export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", cache + "/target")
# The static initramfs binary is built for an explicit target, in a target
# dir of its own, so its RUSTFLAGS never invalidate the host build. Paths
# inside the image's binaries are neutral: the workspace wrapper remaps
# them, and it is named through PATH because Cargo hashes the wrapper as
# given into every workspace crate's symbols (a checkout's path there would
# make each checkout's binaries different).
image_target := "x86_64-unknown-linux-gnu"
image_bins := CARGO_TARGET_DIR / "image-bins"
image_env := "PATH=" + justfile_directory() + "/.cargo:$PATH RUSTC_WORKSPACE_WRAPPER=remap-rustc SLIPWAY_SRC=" + justfile_directory()
builder := CARGO_TARGET_DIR / "release/image-builder"
# The payload built from source, its registry storage and its pins.
fixtures_dir := cache / "fixtures"
# Builds the payload's binaries from source with Go (cached per version).
build_go := "vm-tests/fixtures/build-go.sh " + fixtures_dir + "/out"
# Runs a command with the fixtures' registry up and the mirrors pointing at them.
with_fixtures := "cargo run -q -p vm-tests --bin slipway-fixtures -- with-mirrors " + fixtures_dir + " --"
out := "out"
# The next release the cluster test updates its cluster to.
next_out := "out-next"

# Host packages the build and the tests use (Debian names).
host_packages := "openssl mmdebstrap uidmap e2fsprogs qemu-utils qemu-system-x86 ovmf jq time docker-registry gcc libc6-dev iptables busybox-static dnsmasq-base iproute2 fdisk"

default: build

# Install the host packages the build and tests need (skips what is installed).
deps:
    #!/usr/bin/env bash
    set -euo pipefail
    missing=$(for p in {{host_packages}}; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'ok installed' || echo "$p"; done)
    if [ -n "$missing" ]; then
        echo "installing: $missing" >&2
        sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get update -q
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends $missing
        # The tests start their own registries on loopback; Debian's package
        # would otherwise serve one on every interface.
        if [ -d /run/systemd/system ]; then $sudo systemctl disable --now docker-registry.service || true; fi
    fi
    # moto and cfn-lint, pinned, in a venv of their own (the local AWS the
    # tests run against, the template's linter); checkov in another (its
    # pins clash with moto's).
    for pair in "venv:vm-tests/requirements.txt" "checkov-venv:vm-tests/requirements-checkov.txt"; do
        venv="{{cache}}/${pair%%:*}"; reqs="${pair#*:}"
        if ! cmp -s "$reqs" "$venv/.installed" 2>/dev/null; then
            echo "installing $reqs into $venv" >&2
            python3 -m venv "$venv"
            "$venv/bin/pip" install -q -r "$reqs"
            cp "$reqs" "$venv/.installed"
        fi
    done

# Compile the image builder and the binaries baked into the image.
compile:
    # The builder and the node binary in one build: every dependency (the AWS
    # SDK above all) is compiled once for both.
    {{image_env}} cargo build --release -p image-builder -p slipway-init --bin image-builder --bin slipway-init
    # The initramfs: static, and without the node features (no AWS, TLS or async).
    {{image_env}} RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR={{CARGO_TARGET_DIR}}/initrd \
        cargo build --release -p slipway-init --bin slipway-initrd --no-default-features --target {{image_target}}
    mkdir -p {{image_bins}}
    install -m 0755 {{CARGO_TARGET_DIR}}/release/slipway-init \
        {{CARGO_TARGET_DIR}}/initrd/{{image_target}}/release/slipway-initrd {{image_bins}}/

# Build the default image into out/ (disk.raw, disk.qcow2, build-manifest.json).
build: deps compile-with-payload fixtures
    {{with_fixtures}} {{builder}} build --spec image.toml --out {{out}} --bin-dir {{image_bins}}

# Build the next release the cluster test rolls its cluster to: the same
# spec as image version `<version>-next`, into out-next/ (only the stages
# from the root filesystem on run again).
build-next: build
    #!/usr/bin/env bash
    set -euo pipefail
    version=$(sed -n 's/^version = "\(.*\)"$/\1/p' image.toml | head -n 1)
    {{with_fixtures}} {{builder}} build --spec image.toml --image-version "$version-next" --out {{next_out}} --bin-dir {{image_bins}}

# Publish out/ as a release: snapshot, AMI in `region` (copied to `copy_to`), template.
publish region copy_to="": compile
    {{builder}} publish --out {{out}} --region {{region}} {{ if copy_to != "" { "--copy-to " + copy_to } else { "" } }}

# The production path: build out/ from upstream's payload checked against payload.lock, then publish it.
release region copy_to="": deps compile
    SLIPWAY_PAYLOAD_LOCK={{justfile_directory()}}/payload.lock {{builder}} build --spec image.toml --out {{out}} --bin-dir {{image_bins}} \
        --region {{region}} {{ if copy_to != "" { "--copy-to " + copy_to } else { "" } }}

# `compile` while the Go payload builds (`just fixtures` then finds it
# built): rustc spends long stretches on a single core (the AWS SDK's
# largest crates), which the Go build fills. On a fresh machine here the
# two took 23.4 minutes together (README, "A fresh machine"). Go's lines
# are prefixed `[go]`.
compile-with-payload: deps
    #!/usr/bin/env bash
    set -euo pipefail
    # A job of its own (process group), so a failed compile stops it whole.
    set -m
    ( set -o pipefail; {{build_go}} 2>&1 | sed -u 's/^/[go] /' ) &
    go=$!
    if ! {{just_executable()}} --justfile {{justfile()}} compile; then
        kill -- -"$go" 2>/dev/null || true
        exit 1
    fi
    wait "$go"

# Build the Kubernetes payload from source with Go, make and push its images, pin them.
fixtures: deps
    {{build_go}}
    cargo run -q -p vm-tests --bin slipway-fixtures -- make {{fixtures_dir}}/out/bin image.toml {{fixtures_dir}}

# Re-resolve the Debian package set and rewrite image.lock.
lock: compile
    {{builder}} lock --spec image.toml --payload-lock {{justfile_directory()}}/payload.lock

# The fast tier for the inner loop: rustfmt, clippy, unit tests and the
# integration tests against moto and a local registry (publishing on
# synthetic builds included); no image, no VM.
[doc("The fast tier: rustfmt, clippy, unit and moto tests; no image, no VM.")]
check: deps lint
    # The image import's test runs the payload's own containerd: built from
    # source once per version, found built afterwards.
    {{build_go}}
    cargo test --workspace --exclude vm-tests
    cargo test -p vm-tests --lib --bins --test faults --test release

# Everything: unit and moto tests, then every test of the built images.
# Each image is built once: the tests of the images run through recipes
# without dependencies of their own, which `build-next` has met.
[doc("Everything: unit and moto tests, then every test of the built images.")]
test: build-next
    cargo test --workspace --exclude vm-tests
    just _image-tests
    just _cluster-test

# The tests of the built image against `out/`: its publication to moto,
# then in QEMU boot, tamper, payload and the release update against moto
# (two at a time), then the cluster, which runs its two VMs alone (TCG;
# SLIPWAY_VM_ACCEL=kvm opts in to KVM).
[doc("The tests of the built images, in QEMU and against moto (no unit tests).")]
vm-test: build-next
    just _image-tests
    just _cluster-test

# The cluster in QEMU against moto, IAM enforced: bring-up, node admission,
# the hardened control plane, a release update to out-next/ (the master
# replaced, then the node, each leaving cleanly; the harness plays the
# rolling update moto does not perform), certificate renewal, secrets at
# rest (19-50 minutes under TCG here; needs root for its network namespace).
# A guest kernel that panics or freezes under TCG (an emulator fault the
# test names EMULATOR-FAULT) earns one more attempt; nothing else does.
[doc("The cluster test alone: two VMs in QEMU against moto, 19-50 minutes.")]
cluster-test: build-next
    just _cluster-test

# Every test of the built images but the cluster's, two at a time.
_image-tests:
    SLIPWAY_IMAGE_DIR={{justfile_directory()}}/{{out}} SLIPWAY_NEXT_IMAGE_DIR={{justfile_directory()}}/{{next_out}} \
        cargo test -p vm-tests -- --nocapture --test-threads=2 --skip a_cluster_rolls

# The cluster test, once more on an emulator fault (see `cluster-test`).
_cluster-test:
    #!/usr/bin/env bash
    set -euo pipefail
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    for attempt in 1 2; do
        if SLIPWAY_IMAGE_DIR={{justfile_directory()}}/{{out}} SLIPWAY_NEXT_IMAGE_DIR={{justfile_directory()}}/{{next_out}} \
            cargo test -p vm-tests --test cluster -- --nocapture 2>&1 | tee "$log"; then
            exit 0
        fi
        if ! grep -q EMULATOR-FAULT "$log"; then
            # The error, again after the backtrace, for logs read from the end.
            echo "the cluster test failed; its last steps and its error:" >&2
            grep -E '^\[cluster\]' "$log" | tail -n 8 >&2 || true
            grep -E -A 12 '^(Error: |thread .* panicked)' "$log" | grep -v -E '^ +([0-9]+:| at )' >&2 || true
            exit 1
        fi
        [ "$attempt" = 2 ] || echo "a guest panicked or froze under TCG (the emulator's fault, not the cluster's): running the cluster test once more" >&2
    done
    exit 1

# Each clone compiles its own binaries and builds with a cache of its own;
# the image's binaries and the disk must come out byte for byte the same.
# Two clones of HEAD at different paths build the same binaries and disk.
repro: deps fixtures
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
        echo "note: uncommitted changes are left out (the clones hold HEAD)" >&2
    fi
    # One commit for both clones, whatever HEAD does meanwhile.
    rev=$(git -C "{{justfile_directory()}}" rev-parse HEAD)
    work=$(mktemp -d "{{cache}}/repro.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    declare -A src=([a]="$work/a/src" [b]="$work/b/a-checkout-somewhere-else")
    for side in a b; do
        echo "== build $side from ${src[$side]}" >&2
        git clone -q "{{justfile_directory()}}" "${src[$side]}"
        git -C "${src[$side]}" checkout -q "$rev"
        {{just_executable()}} --justfile "${src[$side]}/justfile" compile
        sha256sum {{image_bins}}/* | sed "s|{{image_bins}}/||" > "$work/$side/bins.sha256"
        # Share only the downloads; every stage is rebuilt from scratch.
        mkdir -p "$work/$side/cache"
        ln -s "{{cache}}/blobs" "$work/$side/cache/blobs"
        {{with_fixtures}} env -C "${src[$side]}" {{builder}} build --spec image.toml \
            --out "$work/$side/out" --bin-dir {{image_bins}} --cache-dir "$work/$side/cache"
    done
    if ! diff -u "$work/a/bins.sha256" "$work/b/bins.sha256"; then
        echo "NOT reproducible: the image's binaries differ between the two checkouts" >&2
        exit 1
    fi
    a=$(jq -r .disk.sha256 "$work/a/out/build-manifest.json")
    b=$(jq -r .disk.sha256 "$work/b/out/build-manifest.json")
    echo "build a: $a"; echo "build b: $b"
    [ "$a" = "$b" ] || { echo "NOT reproducible"; exit 1; }
    echo "reproducible: two checkouts of $rev give the same binaries and disk sha256 $a"

# Build timings (cold, overlay-only, no-op) stage by stage, and sizes;
# with `baseline=PATH` (another image-builder binary, e.g. built from an
# earlier commit) the same builds with it first, and each time's ratio.
bench baseline="": deps compile fixtures
    {{with_fixtures}} cargo run --release -q -p image-builder --example bench -- --builder {{builder}} --bin-dir {{image_bins}} --baseline "{{baseline}}"

# The cluster's bring-up from another built image (`baseline`: a directory
# `just build` filled, e.g. from an earlier commit) and from out/, in turn,
# `rounds` times, on this machine in this run: the master's boot check,
# its API server ready with the add-ons applied, both members Ready, each
# beside the baseline's, with their ratio (5-10 minutes a bring-up under
# TCG; needs root for the cluster's network namespace).
bench-vm baseline rounds="1": deps
    cargo build -q -p vm-tests --bin slipway-vm-bench
    "$CARGO_TARGET_DIR/debug/slipway-vm-bench" "{{baseline}}" "{{justfile_directory()}}/{{out}}" "{{rounds}}"

# rustfmt and clippy, warnings as errors.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Remove build outputs (not the cache).
clean:
    rm -rf {{out}}

# Peak RSS and time of a master's first boot (slipway-init's steps) against moto.
measure-init: deps compile
    {{cache}}/venv/bin/python vm-tests/measure_init.py {{image_bins}}/slipway-init

# A local cluster from the built image (master + node VMs against moto, as the
# cluster test runs it); leaves a kubeconfig and prints how to tear it down.
demo: build
    #!/usr/bin/env bash
    set -euo pipefail
    dir="{{cache}}/demo"
    if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
        echo "a demo cluster is already running (pid $(cat "$dir/pid")); tear it down with: just demo-down" >&2
        exit 1
    fi
    mkdir -p "$dir"
    cargo build -q -p vm-tests --bin slipway-cluster
    SLIPWAY_IMAGE_DIR={{justfile_directory()}}/{{out}} setsid "$CARGO_TARGET_DIR/debug/slipway-cluster" "$dir" \
        > "$dir/cluster.log" 2>&1 < /dev/null &
    echo $! > "$dir/pid"
    echo "starting the cluster (log: $dir/cluster.log); under TCG this takes 5-15 minutes" >&2
    while [ ! -f "$dir/ready" ]; do
        if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
            tail -n 30 "$dir/cluster.log" >&2
            echo "the cluster stopped before it came up (log: $dir/cluster.log)" >&2
            exit 1
        fi
        sleep 5
    done
    echo
    echo "The cluster is up. Use it with:"
    echo "    export KUBECONFIG=$(cat "$dir/ready")"
    echo "    {{fixtures_dir}}/out/bin/kubectl get nodes"
    echo "Tear it down (VMs, moto, the network namespace) with:"
    echo "    just demo-down"

# Roll the running demo cluster to the image built in out/ (give it a new
# version first: raise image.version, or `image-builder build --image-version`):
# the master, then the node, each leaving cleanly and replaced from the new
# release, as a stack update would.
demo-update:
    #!/usr/bin/env bash
    set -euo pipefail
    dir="{{cache}}/demo"
    if [ ! -f "$dir/pid" ] || ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
        echo "no demo cluster is running (start one with: just demo)" >&2
        exit 1
    fi
    rm -f "$dir/updated" "$dir/update-failed"
    echo "{{justfile_directory()}}/{{out}}" > "$dir/update-request"
    echo "rolling the demo cluster to the release in {{out}}/ (log: $dir/cluster.log); under TCG this takes 15-30 minutes" >&2
    while [ ! -f "$dir/updated" ] && [ ! -f "$dir/update-failed" ]; do
        if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
            echo "the demo cluster stopped (log: $dir/cluster.log)" >&2
            exit 1
        fi
        sleep 5
    done
    if [ -f "$dir/update-failed" ]; then
        echo "the update failed: $(cat "$dir/update-failed")" >&2
        exit 1
    fi
    echo "every member runs release $(cat "$dir/updated")"

# Stop the cluster `just demo` started.
demo-down:
    #!/usr/bin/env bash
    set -euo pipefail
    pidfile="{{cache}}/demo/pid"
    if [ ! -f "$pidfile" ]; then echo "no demo cluster is running" >&2; exit 0; fi
    pid=$(cat "$pidfile")
    if kill -TERM "$pid" 2>/dev/null; then
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        # Anything left of its process group (QEMU, moto, dnsmasq).
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    echo "demo cluster stopped (disks and consoles stay in {{cache}}/demo)"
