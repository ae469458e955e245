#!/usr/bin/env bash
# The coordinator's certificate authority and the TLS front's certificate (nginx), with subjectAltNames for every
# name and address the sites use to reach the coordinator. 127.0.0.1 and localhost are always included.
#
# Usage: bash deploy/make_certs.sh OUT_DIR [NAME_OR_IP ...] [--days N]
#   OUT_DIR/ca.crt      send to every site (site.yaml federation.root_certificates)
#   OUT_DIR/ca.key      keep offline; needed only to issue or renew the front certificate
#   OUT_DIR/front.crt   coordinator.yaml front.certificate
#   OUT_DIR/front.key   coordinator.yaml front.key (owner-only)
# An existing CA is reused (renewing the front certificate does not change what the sites trust).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 OUT_DIR [NAME_OR_IP ...] [--days N]" >&2; exit 2; }
out=$1; shift
days=${CERT_DAYS:-825}
names=()
while [ $# -gt 0 ]; do
  case "$1" in
    --days) days=$2; shift 2 ;;
    *) names+=("$1"); shift ;;
  esac
done
command -v openssl >/dev/null || { echo "openssl not found (apt-get install -y openssl)" >&2; exit 2; }
mkdir -p "$out"
umask 077
san="IP:127.0.0.1,DNS:localhost"
cn=${names[0]:-localhost}
for n in "${names[@]:-}"; do
  [ -n "$n" ] || continue
  if [[ "$n" =~ ^[0-9.]+$ || "$n" == *:* ]]; then san="$san,IP:$n"; else san="$san,DNS:$n"; fi
done
if [ ! -s "$out/ca.key" ] || [ ! -s "$out/ca.crt" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:secp384r1 -nodes -days "$((days + 365))" \
    -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=spinefed coordinator CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
openssl req -newkey ec -pkeyopt ec_paramgen_curve:secp384r1 -nodes -keyout "$out/front.key" \
  -out "$out/front.csr" -subj "/CN=$cn" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' \
  "$san" > "$out/front.ext"
openssl x509 -req -in "$out/front.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -days "$days" \
  -out "$out/front.crt" -extfile "$out/front.ext" 2>/dev/null
rm -f "$out/front.csr" "$out/front.ext"
chmod 644 "$out/ca.crt" "$out/front.crt"
echo "certificates in $out: ca.crt (to the sites), front.crt/front.key (coordinator), SANs: $san"
