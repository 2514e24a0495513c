#!/usr/bin/env bash
# Autobahn|Testsuite, the RFC 6455 conformance suite, against mconnector's websocket server.
#
#   tools/autobahn.sh                  start examples/ws_echo.py on a free port, run the
#                                      suite against it, stop it, print a summary
#   tools/autobahn.sh ws://HOST:PORT   the same against an echo server already running
#
# Settings, from the environment:
#   CASES          cases to run, comma-separated (default: every case, "*")
#   EXCLUDE        cases left out, comma-separated (default: none; sections 12 and 13, the
#                  permessage-deflate cases, are the slow ones: EXCLUDE="12.*,13.*" skips them)
#   AUTOBAHN_HOME  where the suite is installed (default ~/.cache/autobahn-testsuite)
#   AUTOBAHN_OUT   where its reports go, HTML and JSON per case (default ./autobahn-reports)
#   PYTHON         the Python 3 that runs the echo server (default python3)
#
# The suite (autobahntestsuite 0.8.2) is Python 2 software. The first run installs it with
# the pip of a Python 2.7, pyenv's or the one on PATH, into AUTOBAHN_HOME (a few minutes);
# later runs reuse it.
# Exit status: 0 when every case passed, 1 when one failed, 2 when the suite could not run.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
cases=${CASES:-*}
exclude=${EXCLUDE-}
home=${AUTOBAHN_HOME:-$HOME/.cache/autobahn-testsuite}
out=${AUTOBAHN_OUT:-$PWD/autobahn-reports}
fail() { echo "autobahn.sh: $*" >&2; exit 2; }

# -- the suite, installed once --
py2=""
if command -v pyenv >/dev/null 2>&1; then
  py2=$(ls -d "$(pyenv root)"/versions/2.7*/bin/python 2>/dev/null | sort -V | tail -n 1)
fi
[ -n "$py2" ] || py2=$(command -v python2.7 || command -v python2 || true)
[ -n "$py2" ] || fail "the suite needs a Python 2.7 (none under pyenv, none on PATH)"
if [ ! -x "$home/bin/wstest" ]; then
  echo "autobahn.sh: installing autobahntestsuite 0.8.2 into $home" >&2
  mkdir -p "$home"
  "$py2" -m pip install --quiet --disable-pip-version-check --target "$home" \
      "autobahntestsuite==0.8.2" >"$home/install.log" 2>&1 \
    || fail "the installation failed; see $home/install.log"
  # zope.interface installed with --target lacks the file that makes zope a package for
  # Python 2.
  touch "$home/zope/__init__.py"
fi

# -- the server: the one given, or examples/ws_echo.py on a free port --
work=$(mktemp -d)
server=""
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; fi
  rm -rf "$work"
}
trap cleanup EXIT
url=${1:-}
if [ -z "$url" ]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$python" "$here/examples/ws_echo.py" "$port" \
    >"$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 100); do
    grep -q 'echo server on' "$work/server.log" && break
    kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; fail "the echo server did not start"; }
    sleep 0.1
  done
  url=ws://127.0.0.1:$port
fi

# -- the run --
mkdir -p "$out"
"$python" - "$url" "$cases" "$exclude" "$out" >"$work/spec.json" <<'EOF'
import json, sys
url, cases, exclude, out = sys.argv[1:]
names = lambda text: [name.strip() for name in text.split(',') if name.strip()]
json.dump({'outdir': out, 'servers': [{'agent': 'mconnector', 'url': url}],
           'cases': names(cases), 'exclude-cases': names(exclude),
           'exclude-agent-cases': {}}, sys.stdout)
EOF
echo "autobahn.sh: running the suite against $url (reports in $out)" >&2
(cd "$work" && PYTHONPATH="$home" "$py2" "$home/bin/wstest" -m fuzzingclient -s spec.json \
   >"$work/wstest.log" 2>&1)
[ -f "$out/index.json" ] || { tail -n 30 "$work/wstest.log" >&2; fail "the suite wrote no report"; }

# -- the summary --
"$python" - "$out/index.json" <<'EOF'
import collections, json, sys
with open(sys.argv[1]) as f:
    results = json.load(f)['mconnector']
number = lambda case: [int(part) for part in case.split('.')]
behaviour = collections.Counter(r['behavior'] for r in results.values())
closing = collections.Counter(r['behaviorClose'] for r in results.values())
failed = sorted((case for case, r in results.items()
                 if r['behavior'] in ('FAILED', 'UNIMPLEMENTED')
                 or r['behaviorClose'] in ('FAILED', 'UNCLEAN')), key=number)
print('cases: %d  behavior: %s  close: %s' % (len(results), dict(sorted(behaviour.items())),
                                             dict(sorted(closing.items()))))
for case in failed:
    r = results[case]
    print('  %-8s behavior=%s close=%s  (%s)' % (case, r['behavior'], r['behaviorClose'],
                                               r['reportfile']))
print('%d passed, %d failed' % (len(results) - len(failed), len(failed)))
sys.exit(1 if failed else 0)
EOF
