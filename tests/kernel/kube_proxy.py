"""What an upstream kube-proxy (v1.30) and the kubelet leave in a node's tables, as fixtures.

Written the way they write it (iptables-save order and spelling, kube-proxy's
chain-name hashes computed as upstream does: base32 of sha256 of
"ns/name:port" + protocol [+ endpoint]), on the netlab's addresses so the
rules carry real traffic in the mini-cluster: kube-proxy's Services live on
198.18.210.0/24 (ClusterIPs) and 198.18.212.0/24 (LoadBalancer IPs), with
NodePorts 31080/31081, so they never shadow pyproxy's (198.18.200.0/24,
30080-30083). Foreign rules (a Docker-like setup and a plain INPUT rule) sit
next to them; `pyproxy cleanup --kube-proxy` must leave those, the kubelet's
chains and pyproxy's own rules exactly as they are.
"""

# The fixtures are verbatim iptables-save lines, which are long.
# ruff: noqa: E501

from __future__ import annotations

import re

KUBE_WEB_IP = "198.18.210.10"
KUBE_EMPTY_IP = "198.18.210.11"
KUBE_LB_CLUSTER_IP = "198.18.210.12"
KUBE_LB_IP = "198.18.212.10"
KUBE_NODE_PORT = 31080
KUBE_LB_NODE_PORT = 31081

SVC_WEB = "OOTBAKQILXSJ5SN2"  # legacy/web:http
SVC_LB = "FBYL7YB24F4DZSJ2"  # legacy/lb:http
SEP_WEB_1 = "CA3INSKS3AOC457P"  # legacy/web:http 198.18.1.1:8080
SEP_WEB_2 = "GQJXJJDMNRO6GQC2"  # legacy/web:http 198.18.1.2:8080
SEP_LB_1 = "2B7GNKZBYP7QC6BX"  # legacy/lb:http 198.18.1.1:8080
SEP_LB_3 = "DETVIP5XMV4T5AWQ"  # legacy/lb:http 198.18.1.3:8080

# kube-proxy iptables mode: mangle (canaries and the kubelet's backend hint), filter, nat.
IPTABLES_MODE = f"""\
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-NODEPORTS -p tcp -m comment --comment "legacy/lb:http health check node port" -m tcp --dport 32100 -j ACCEPT
-A KUBE-PROXY-FIREWALL -d {KUBE_LB_IP}/32 -p tcp -m comment --comment "legacy/lb:http traffic not accepted by KUBE-FW-{SVC_LB}" -m tcp --dport 80 -j DROP
-A KUBE-SERVICES -d {KUBE_EMPTY_IP}/32 -p tcp -m comment --comment "legacy/empty:http has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-EXT-{SVC_LB} - [0:0]
:KUBE-EXT-{SVC_WEB} - [0:0]
:KUBE-FW-{SVC_LB} - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SEP-{SEP_LB_1} - [0:0]
:KUBE-SEP-{SEP_LB_3} - [0:0]
:KUBE-SEP-{SEP_WEB_1} - [0:0]
:KUBE-SEP-{SEP_WEB_2} - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-{SVC_LB} - [0:0]
:KUBE-SVC-{SVC_WEB} - [0:0]
:KUBE-SVL-{SVC_LB} - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-EXT-{SVC_LB} -s 198.18.1.0/24 -m comment --comment "pod traffic for legacy/lb:http external destinations" -j KUBE-SVC-{SVC_LB}
-A KUBE-EXT-{SVC_LB} -m comment --comment "masquerade LOCAL traffic for legacy/lb:http external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-{SVC_LB} -m comment --comment "route LOCAL traffic for legacy/lb:http external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-{SVC_LB}
-A KUBE-EXT-{SVC_LB} -j KUBE-SVL-{SVC_LB}
-A KUBE-EXT-{SVC_WEB} -m comment --comment "masquerade traffic for legacy/web:http external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-{SVC_WEB} -j KUBE-SVC-{SVC_WEB}
-A KUBE-FW-{SVC_LB} -s 198.18.150.0/24 -m comment --comment "legacy/lb:http loadbalancer IP" -j KUBE-EXT-{SVC_LB}
-A KUBE-FW-{SVC_LB} -m comment --comment "other traffic to legacy/lb:http will be dropped by KUBE-PROXY-FIREWALL"
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-NODEPORTS -p tcp -m comment --comment "legacy/lb:http" -m tcp --dport {KUBE_LB_NODE_PORT} -j KUBE-EXT-{SVC_LB}
-A KUBE-NODEPORTS -p tcp -m comment --comment "legacy/web:http" -m tcp --dport {KUBE_NODE_PORT} -j KUBE-EXT-{SVC_WEB}
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SEP-{SEP_LB_1} -s 198.18.1.1/32 -m comment --comment "legacy/lb:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-{SEP_LB_1} -p tcp -m comment --comment "legacy/lb:http" -m tcp -j DNAT --to-destination 198.18.1.1:8080
-A KUBE-SEP-{SEP_LB_3} -s 198.18.1.3/32 -m comment --comment "legacy/lb:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-{SEP_LB_3} -p tcp -m comment --comment "legacy/lb:http" -m tcp -j DNAT --to-destination 198.18.1.3:8080
-A KUBE-SEP-{SEP_WEB_1} -s 198.18.1.1/32 -m comment --comment "legacy/web:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-{SEP_WEB_1} -p tcp -m comment --comment "legacy/web:http" -m tcp -j DNAT --to-destination 198.18.1.1:8080
-A KUBE-SEP-{SEP_WEB_2} -s 198.18.1.2/32 -m comment --comment "legacy/web:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-{SEP_WEB_2} -p tcp -m comment --comment "legacy/web:http" -m tcp -j DNAT --to-destination 198.18.1.2:8080
-A KUBE-SERVICES -d {KUBE_WEB_IP}/32 -p tcp -m comment --comment "legacy/web:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-{SVC_WEB}
-A KUBE-SERVICES -d {KUBE_LB_CLUSTER_IP}/32 -p tcp -m comment --comment "legacy/lb:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-{SVC_LB}
-A KUBE-SERVICES -d {KUBE_LB_IP}/32 -p tcp -m comment --comment "legacy/lb:http loadbalancer IP" -m tcp --dport 80 -j KUBE-FW-{SVC_LB}
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-{SVC_LB} ! -s 198.18.1.0/24 -d {KUBE_LB_CLUSTER_IP}/32 -p tcp -m comment --comment "legacy/lb:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-{SVC_LB} -m comment --comment "legacy/lb:http -> 198.18.1.1:8080" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-{SEP_LB_1}
-A KUBE-SVC-{SVC_LB} -m comment --comment "legacy/lb:http -> 198.18.1.3:8080" -j KUBE-SEP-{SEP_LB_3}
-A KUBE-SVC-{SVC_WEB} ! -s 198.18.1.0/24 -d {KUBE_WEB_IP}/32 -p tcp -m comment --comment "legacy/web:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-{SVC_WEB} -m comment --comment "legacy/web:http -> 198.18.1.1:8080" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-{SEP_WEB_1}
-A KUBE-SVC-{SVC_WEB} -m comment --comment "legacy/web:http -> 198.18.1.2:8080" -j KUBE-SEP-{SEP_WEB_2}
-A KUBE-SVL-{SVC_LB} -m comment --comment "legacy/lb:http -> 198.18.1.1:8080" -j KUBE-SEP-{SEP_LB_1}
COMMIT
"""

# A dual-stack kube-proxy writes ip6tables too (here a single IPv6 Service).
IPTABLES_MODE_V6 = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SERVICES - [0:0]
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SEP-KL27LCFLLTQLY42U - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-JK6HPZYYOI2XOABB - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-SEP-KL27LCFLLTQLY42U -p tcp -m comment --comment "legacy/web6:http" -m tcp -j DNAT --to-destination [fd00:1::1]:8080
-A KUBE-SERVICES -d fd00:210::10/128 -p tcp -m comment --comment "legacy/web6:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-JK6HPZYYOI2XOABB
-A KUBE-SVC-JK6HPZYYOI2XOABB -m comment --comment "legacy/web6:http -> [fd00:1::1]:8080" -j KUBE-SEP-KL27LCFLLTQLY42U
COMMIT
"""

# kube-proxy IPVS mode's iptables rules (they match on its ipsets, below).
IPVS_MODE = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-IPVS-OUT-FILTER - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SOURCE-RANGES-FIREWALL - [0:0]
-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER
-A INPUT -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A OUTPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-OUT-FILTER
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN
-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT --reject-with icmp-port-unreachable
-A KUBE-NODE-PORT -m comment --comment "Kubernetes health check node port" -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT
-A KUBE-PROXY-FIREWALL -m comment --comment "Kubernetes service load balancer ip + port for load balancer with sourceRange" -m set --match-set KUBE-LOAD-BALANCER-FW dst,dst -j KUBE-SOURCE-RANGES-FIREWALL
-A KUBE-SOURCE-RANGES-FIREWALL -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-LOAD-BALANCER - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port for masquerade purpose" -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ
-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SERVICES ! -s 198.18.1.0/24 -m comment --comment "Kubernetes service cluster ip + port for masquerade purpose" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m comment --comment "Kubernetes service lb portal" -m set --match-set KUBE-LOAD-BALANCER dst,dst -j KUBE-LOAD-BALANCER
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
-A KUBE-SERVICES -m set --match-set KUBE-LOAD-BALANCER dst,dst -j ACCEPT
COMMIT
"""

# kube-proxy IPVS mode's ipsets, as `ipset save` writes them (kube-proxy adds comments).
IPVS_SETS = f"""\
create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536
add KUBE-CLUSTER-IP {KUBE_WEB_IP},tcp:80
add KUBE-CLUSTER-IP {KUBE_LB_CLUSTER_IP},tcp:80
create KUBE-LOOP-BACK hash:ip,port,ip family inet hashsize 1024 maxelem 65536
add KUBE-LOOP-BACK 198.18.1.1,tcp:8080,198.18.1.1
add KUBE-LOOP-BACK 198.18.1.2,tcp:8080,198.18.1.2
create KUBE-EXTERNAL-IP hash:ip,port family inet hashsize 1024 maxelem 65536
create KUBE-EXTERNAL-IP-LOCAL hash:ip,port family inet hashsize 1024 maxelem 65536
create KUBE-LOAD-BALANCER hash:ip,port family inet hashsize 1024 maxelem 65536
add KUBE-LOAD-BALANCER {KUBE_LB_IP},tcp:80
create KUBE-LOAD-BALANCER-FW hash:ip,port family inet hashsize 1024 maxelem 65536
create KUBE-LOAD-BALANCER-SOURCE-CIDR hash:ip,port,net family inet hashsize 1024 maxelem 65536
create KUBE-NODE-PORT-TCP bitmap:port range 0-65535
add KUBE-NODE-PORT-TCP {KUBE_NODE_PORT}
create KUBE-NODE-PORT-UDP bitmap:port range 0-65535
create KUBE-HEALTH-CHECK-NODE-PORT bitmap:port range 0-65535
create KUBE-IPVS-IPS hash:ip family inet hashsize 1024 maxelem 65536
add KUBE-IPVS-IPS {KUBE_WEB_IP}
add KUBE-IPVS-IPS {KUBE_LB_CLUSTER_IP}
add KUBE-IPVS-IPS {KUBE_LB_IP}
"""

# Other software's rules: a Docker-like bridge setup and a plain INPUT rule.
FOREIGN = """\
*filter
:DOCKER - [0:0]
:DOCKER-USER - [0:0]
-A INPUT -s 198.18.250.2/32 -j ACCEPT
-A FORWARD -j DOCKER-USER
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A DOCKER-USER -j RETURN
COMMIT
*nat
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 198.19.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
COMMIT
"""

FOREIGN_V6 = """\
*filter
-A INPUT -s fd00:250::2/128 -j ACCEPT
COMMIT
"""

_COUNTERS = re.compile(r"\[\d+:\d+\]")


def kube_proxy_line(line: str) -> bool:
    """A line of iptables-save output that is kube-proxy's: its chains' declarations and
    rules, and rules elsewhere that jump into them. Never the kubelet's."""
    from pyproxy.migrate import is_kube_proxy_chain

    words = line.split()
    if line.startswith(":"):
        return is_kube_proxy_chain(words[0][1:])
    if line.startswith("-A "):
        if is_kube_proxy_chain(words[1]):
            return True
        for flag in ("-j", "-g"):
            if flag in words and is_kube_proxy_chain(words[words.index(flag) + 1]):
                return True
    return False


def normalized(save: str) -> list[str]:
    """iptables-save output without comments and counters, for exact comparisons."""
    return [_COUNTERS.sub("[0:0]", line) for line in save.splitlines()
            if line.strip() and not line.startswith("#")]


def without_kube_proxy(save: str) -> list[str]:
    return [line for line in normalized(save) if not kube_proxy_line(line)]
