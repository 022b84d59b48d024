#!/usr/bin/env bash
# Runs a kiln job on two "hosts" on this one machine: two network namespaces joined by a veth
# pair (10.77.0.1 and 10.77.0.2), ranks talking MPI over TCP between them. mpirun runs in the
# first namespace and starts the second host's daemon through a small rsh agent that enters
# the second namespace instead of using ssh. Needs root (ip netns) and iproute2.
#
#   scripts/two_hosts.sh [KILN_COMMAND...]     default: kiln collectives --bench --json
#   KILN=target/release/kiln NPROC=1 scripts/two_hosts.sh kiln train cnn-mnist --epochs 1
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=$(realpath "${KILN:-target/release/kiln}")
NPROC=${NPROC:-1}
[ -x "$KILN" ] || { echo "two_hosts.sh: $KILN is not built (cargo build --release --features mpi)" >&2; exit 2; }
[ "$#" -gt 0 ] || set -- kiln collectives --bench --json

tag="kiln$$"
h1="${tag}a" h2="${tag}b"
work=$(mktemp -d)
cleanup() {
    ip netns pids "$h1" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns pids "$h2" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$h1" 2>/dev/null || true
    ip netns del "$h2" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$h1"
ip netns add "$h2"
ip link add "${tag}1" type veth peer name "${tag}2"
ip link set "${tag}1" netns "$h1"
ip link set "${tag}2" netns "$h2"
ip -n "$h1" addr add 10.77.0.1/24 dev "${tag}1"
ip -n "$h2" addr add 10.77.0.2/24 dev "${tag}2"
for ns in "$h1" "$h2"; do ip -n "$ns" link set lo up; done
ip -n "$h1" link set "${tag}1" up
ip -n "$h2" link set "${tag}2" up

# mpirun calls `AGENT HOST COMMAND...` to start its daemon on HOST, as it would call ssh.
cat > "$work/netns-rsh" <<AGENT
#!/bin/sh
host=\$1; shift
case "\$host" in
    10.77.0.1) ns=$h1 ;;
    10.77.0.2) ns=$h2 ;;
    *) echo "netns-rsh: unknown host \$host" >&2; exit 1 ;;
esac
exec ip netns exec "\$ns" /bin/sh -c "\$*"
AGENT
chmod +x "$work/netns-rsh"

echo "two_hosts.sh: 10.77.0.1 ($h1) and 10.77.0.2 ($h2), $NPROC rank(s) each, over TCP" >&2
# Both "hosts" share this machine's cores: binding each rank to its host's first core would put
# them on the same core.
ip netns exec "$h1" env OMPI_MCA_plm_rsh_agent="$work/netns-rsh" OMPI_MCA_hwloc_base_binding_policy=none \
    "$KILN" launch --nproc-per-node "$NPROC" --hosts 10.77.0.1,10.77.0.2 \
    --transport tcp --tcp-interface 10.77.0.0/24 -- "$@"
