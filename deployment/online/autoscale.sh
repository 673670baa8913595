#!/usr/bin/env bash
# Autoscale the online deployment with Azure Monitor: 1 to 4 instances.
#   Scale out by 1 when the endpoint's average request latency passes 20 s over 5 minutes (requests are
#   queueing: one 768x768 50-step image takes ~2.5 s on an A100, 2 at a time per instance), or when the
#   deployment's average GPU use passes 70 % over 5 minutes.
#   Scale in by 1 when latency stays under 5 s and GPU use under 30 % for 10 minutes.
# A new instance takes several minutes to pull the image and load the model (the probes allow 15), so scale
# out early and in slowly. Needs `az` logged in, with defaults for group and workspace (az configure).
#   bash deployment/online/autoscale.sh [ENDPOINT] [DEPLOYMENT]
set -euo pipefail
ENDPOINT=${1:-sd21-endpoint}
DEPLOYMENT=${2:-sd21}
NAME=${AUTOSCALE_NAME:-autoscale-$ENDPOINT-$DEPLOYMENT}
MIN=${MIN_INSTANCES:-1}
MAX=${MAX_INSTANCES:-4}

endpoint_id=$(az ml online-endpoint show -n "$ENDPOINT" --query id -o tsv)
deployment_id=$(az ml online-deployment show -e "$ENDPOINT" -n "$DEPLOYMENT" --query id -o tsv)

az monitor autoscale create --name "$NAME" --resource "$deployment_id" \
  --min-count "$MIN" --max-count "$MAX" --count "$MIN"

# Endpoint metric, in milliseconds.
az monitor autoscale rule create --autoscale-name "$NAME" --resource "$endpoint_id" \
  --condition "RequestLatency > 20000 avg 5m" --scale out 1 --cooldown 10
az monitor autoscale rule create --autoscale-name "$NAME" --resource "$endpoint_id" \
  --condition "RequestLatency < 5000 avg 10m" --scale in 1 --cooldown 15

# Deployment metrics.
az monitor autoscale rule create --autoscale-name "$NAME" \
  --condition "GpuUtilizationPercentage > 70 avg 5m" --scale out 1 --cooldown 10
az monitor autoscale rule create --autoscale-name "$NAME" \
  --condition "GpuUtilizationPercentage < 30 avg 10m" --scale in 1 --cooldown 15

az monitor autoscale show --name "$NAME" --query "{name:name, enabled:enabled, profiles:profiles[].capacity}" -o json
