#!/bin/sh
# Renders RabbitMQ's definitions from definitions.template.jsonc: drops the // comment lines and
# fills in each user's password from DIR/amqp-<user>-password (a mounted Secret). Run by the
# broker's init container (manifests/base/rabbitmq.yaml) and by docker/compose.yaml.
#   render-definitions.sh TEMPLATE DIR OUT
# Passwords: 16 or more of A-Z a-z 0-9 . _ ~ - (safe as they are in an AMQP URL, JSON and sed),
# e.g. `openssl rand -hex 24`. The output (passwords included) is readable by its owner only.
set -eu
template=$1 dir=$2 out=$3
umask 077
script="$out.sed"
: >"$script"
for user in admin dispatcher worker autoscaler; do
    file="$dir/amqp-$user-password"
    password=$(cat "$file")
    case $password in
    *[!A-Za-z0-9._~-]*)
        echo "render-definitions: $file may hold only A-Z a-z 0-9 . _ ~ -" >&2
        exit 1
        ;;
    esac
    if [ "${#password}" -lt 16 ]; then
        echo "render-definitions: $file holds fewer than 16 characters" >&2
        exit 1
    fi
    printf 's|@%s_password@|%s|g\n' "$user" "$password" >>"$script"
done
sed -e '/^[[:space:]]*\/\//d' -f "$script" "$template" >"$out.tmp"
rm -f "$script"
if grep -q '@[a-z]*_password@' "$out.tmp"; then
    echo "render-definitions: $template has a placeholder with no password file" >&2
    exit 1
fi
mv "$out.tmp" "$out"
echo "render-definitions: wrote $out"
