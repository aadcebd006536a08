#!/usr/bin/env bash
# Installs the servers the test suite starts on free ports, from Debian's packages, when they
# are missing: redis-server (the job queue) and prometheus (the metrics test); and the browser
# the playground's tests drive: chromium and chromium-driver (its command: chromedriver).
#   deploy/install-tools.sh [PACKAGE...]     (default: redis-server prometheus)
set -euo pipefail
want=("$@")
[ ${#want[@]} -gt 0 ] || want=(redis-server prometheus)
missing=()
for tool in "${want[@]}"; do
  command="$tool"
  [ "$tool" = chromium-driver ] && command=chromedriver  # the package's one command
  command -v "$command" >/dev/null || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "==> installing Debian's ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
# policy-rc.d 101: install the packages without starting their system services (the tests
# start their own on free ports). An existing policy is left as it is.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  $sudo sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
  trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
