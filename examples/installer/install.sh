#!/bin/sh
# A toy package installer: the system under test in the example suite.
# usage: install.sh install|uninstall|status PREFIX
set -eu
action=$1
prefix=${2:-/opt/hello}
case "$action" in
install)
    mkdir -p "$prefix/bin" /etc/hello
    printf '#!/bin/sh\necho "hello from %s"\n' "$prefix" > "$prefix/bin/hello"
    chmod 755 "$prefix/bin/hello"
    [ -f /etc/hello/hello.conf ] || echo "greeting=hello" > /etc/hello/hello.conf
    echo "$prefix" > /etc/hello/installed
    echo "installed into $prefix"
    ;;
uninstall)
    [ -f /etc/hello/installed ] || { echo "not installed" >&2; exit 2; }
    rm -rf "$(cat /etc/hello/installed)" /etc/hello
    echo "uninstalled"
    ;;
status)
    if [ -f /etc/hello/installed ]; then echo "installed: $(cat /etc/hello/installed)"; else echo "absent"; exit 1; fi
    ;;
*)
    echo "unknown action: $action" >&2
    exit 64
    ;;
esac
