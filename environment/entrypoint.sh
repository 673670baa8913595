#!/bin/sh
# The online image's command: which server to run, on port 5001 (SD_ENDPOINT_PORT).
#   SD_ENDPOINT_SERVER=azmlinfsrv  Azure's inference server with a scoring script: the one Azure mounted from
#                                  code_configuration (AML_APP_ROOT/AZUREML_ENTRY_SCRIPT), else the image's
#                                  score.py. The default when Azure set AZUREML_ENTRY_SCRIPT.
#   SD_ENDPOINT_SERVER=serve       sd-endpoint's own server (micro-batching, /ready, /metrics). The default
#                                  otherwise, e.g. `docker run`.
set -eu
port="${SD_ENDPOINT_PORT:-5001}"
server="${SD_ENDPOINT_SERVER:-}"
if [ -z "$server" ]; then
  if [ -n "${AZUREML_ENTRY_SCRIPT:-}" ]; then server=azmlinfsrv; else server=serve; fi
fi
case "$server" in
  azmlinfsrv)
    script="${AZUREML_ENTRY_SCRIPT:-${SD_ENDPOINT_HOME:-/opt/sd-endpoint}/score.py}"
    case "$script" in
      /*) ;;
      *) script="${AML_APP_ROOT:-/var/azureml-app}/$script" ;;
    esac
    cd "$(dirname "$script")"
    exec azmlinfsrv --entry_script "$script" --port "$port"
    ;;
  serve)
    exec sd-endpoint serve --host 0.0.0.0 --port "$port"
    ;;
  *)
    echo "SD_ENDPOINT_SERVER=$server: expected 'azmlinfsrv' or 'serve'" >&2
    exit 2
    ;;
esac
