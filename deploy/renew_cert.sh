#!/usr/bin/env bash
# Renew the coordinator's front certificate (nginx) before it expires: same CA, same subject and subjectAltNames as
# the current certificate, a new key (default) or the old one (--keep-key), then an optional live reload of nginx.
# The sites trust the CA, not this certificate, so nothing changes at the sites.
#
# Usage: bash deploy/renew_cert.sh CERT_DIR [--days N] [--keep-key] [--reload STATE_DIR]
#   CERT_DIR     the folder deploy/make_certs.sh wrote (ca.crt, ca.key, front.crt, front.key)
#   --days N     validity of the new certificate (default 825, or $CERT_DAYS)
#   --keep-key   re-sign the existing front.key instead of making a new key
#   --reload D   signal the running front (nginx, started by `server`) to reload: HUP to D/front/nginx.pid
# The previous certificate and key are kept as front.crt.<UTC time>.old / front.key.<UTC time>.old.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 CERT_DIR [--days N] [--keep-key] [--reload STATE_DIR]" >&2; exit 2; }
dir=$1; shift
days=${CERT_DAYS:-825}
keep_key=0
state=""
while [ $# -gt 0 ]; do
  case "$1" in
    --days) days=$2; shift 2 ;;
    --keep-key) keep_key=1; shift ;;
    --reload) state=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v openssl >/dev/null || { echo "openssl not found (apt-get install -y openssl)" >&2; exit 2; }
for f in ca.crt ca.key front.crt front.key; do
  [ -s "$dir/$f" ] || { echo "$dir/$f: missing (make the certificates first with deploy/make_certs.sh)" >&2; exit 2; }
done
# The SANs exactly as the current certificate has them, in openssl's config syntax ("IP Address:" -> "IP:").
san=$(openssl x509 -in "$dir/front.crt" -noout -ext subjectAltName 2>/dev/null | tail -n +2 \
      | sed -e 's/^ *//' -e 's/IP Address:/IP:/g' -e 's/, /,/g')
[ -n "$san" ] || { echo "$dir/front.crt has no subjectAltName; make a new one with deploy/make_certs.sh" >&2; exit 2; }
subject=$(openssl x509 -in "$dir/front.crt" -noout -subject -nameopt compat | sed 's/^subject=//')
umask 077
stamp=$(date -u +%Y%m%dT%H%M%SZ)
tmp=$(mktemp -d "$dir/.renew.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
if [ "$keep_key" = 1 ]; then
  cp "$dir/front.key" "$tmp/front.key"
else
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:secp384r1 -out "$tmp/front.key" 2>/dev/null
fi
openssl req -new -key "$tmp/front.key" -out "$tmp/front.csr" -subj "$subject" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' \
  "$san" > "$tmp/front.ext"
openssl x509 -req -in "$tmp/front.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days "$days" \
  -out "$tmp/front.crt" -extfile "$tmp/front.ext" 2>/dev/null
openssl verify -CAfile "$dir/ca.crt" "$tmp/front.crt" >/dev/null
chmod 644 "$tmp/front.crt"
cp -p "$dir/front.crt" "$dir/front.crt.$stamp.old"
cp -p "$dir/front.key" "$dir/front.key.$stamp.old"
# Key first, then certificate, each by rename: nginx reads both only on reload.
mv "$tmp/front.key" "$dir/front.key"
mv "$tmp/front.crt" "$dir/front.crt"
end=$(openssl x509 -in "$dir/front.crt" -noout -enddate | sed 's/^notAfter=//')
echo "renewed $dir/front.crt until $end; SANs: $san; key: $([ "$keep_key" = 1 ] && echo kept || echo new)"
if [ -n "$state" ]; then
  pidfile="$state/front/nginx.pid"
  if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    kill -HUP "$(cat "$pidfile")"
    echo "front reloaded (nginx pid $(cat "$pidfile")); sites keep their connections"
  else
    echo "front not running ($pidfile); the new certificate is used at the next \`server\` start"
  fi
fi
