{{/* Names and labels shared by every template. */}}
{{- define "testlooper.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "testlooper.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "testlooper.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "testlooper.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "testlooper.selectorLabels" -}}
app.kubernetes.io/name: {{ include "testlooper.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "testlooper.serviceAccountName" -}}
{{- default (include "testlooper.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "testlooper.redisName" -}}
{{- printf "%s-redis" (include "testlooper.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The namespaces the WorkerPool goes to: each watched one, else the release's. */}}
{{- define "testlooper.poolNamespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- join "," .Values.watchNamespaces -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/*
The operator's permissions: exactly what it was seen to use in the tests. tests/test_operator_e2e.py
renders this chart and compares every (API group, resource, verb) the operator process called on
the emulator with these rules: nothing used is missing, nothing granted is unused. This is the
one place the rules are written.

Cluster-scoped: granted by a ClusterRole whatever watchNamespaces says.
*/}}
{{- define "testlooper.clusterScopedRules" -}}
# kopf discovers resources and namespaces as they come and go.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end -}}

{{/*
Namespaced: in a ClusterRole when watching every namespace, else in a Role per watched namespace.
The argument is the peering resource: kopfpeerings in namespaces, clusterkopfpeerings with
--all-namespaces (a cluster-scoped object, so that rule only works in a ClusterRole).
*/}}
{{- define "testlooper.namespacedRules" -}}
# Events on Repos (definitions errors, TestRuns created, git unreachable).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# A Repo's credentialsSecret and webhookSecret, read by name only: never watched. The
# operator's own Secret (testlooper-operator) is read or created; each run's token Secret is
# created, listed by its TestRun's label, and deleted when the run ends.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, create, delete]
# Each run of a TestRun is a pod: created by the admission loop, watched for its phase,
# deleted once its result is counted.
- apiGroups: [""]
  resources: [pods]
  verbs: [create, list, watch, delete]
# Peering: replicas find each other here; the first creates the object.
- apiGroups: [kopf.dev]
  resources: [{{ . }}]
  verbs: [create, list, watch, patch]
# Repos: watched; patched for kopf's finalizer; status written by the poll.
- apiGroups: [testlooper.dev]
  resources: [repos]
  verbs: [list, watch, patch]
- apiGroups: [testlooper.dev]
  resources: [repos/status]
  verbs: [patch]
# TestRuns: created per task of each new head, cancelled (spec.cancel), deleted by retention;
# read one by one when their runs are decided.
- apiGroups: [testlooper.dev]
  resources: [testruns]
  verbs: [create, get, list, watch, patch, delete]
- apiGroups: [testlooper.dev]
  resources: [testruns/status]
  verbs: [patch]
# WorkerPools: watched; patched for kopf's finalizer (its usage timer); status counts usage.
- apiGroups: [testlooper.dev]
  resources: [workerpools]
  verbs: [list, watch, patch]
- apiGroups: [testlooper.dev]
  resources: [workerpools/status]
  verbs: [patch]
{{- end -}}

{{/* Every WorkerPool the chart makes, as {name, spec, value}: `value` names it in messages. */}}
{{- define "testlooper.workerPools" -}}
{{- $pools := list -}}
{{- if .Values.workerPool.create -}}
{{- $pools = append $pools (dict "name" .Values.workerPool.name "spec" .Values.workerPool.spec "value" "workerPool") -}}
{{- end -}}
{{- range $index, $pool := .Values.extraWorkerPools -}}
{{- $pools = append $pools (dict "name" $pool.name "spec" $pool.spec "value" (printf "extraWorkerPools[%d]" $index)) -}}
{{- end -}}
{{- toJson $pools -}}
{{- end -}}

{{/* "true" when a WorkerPool of the chart has provider ec2. */}}
{{- define "testlooper.hasEc2Pool" -}}
{{- range (include "testlooper.workerPools" . | fromJsonArray) -}}
{{- if eq .spec.provider "ec2" -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/*
--ec2-api-url: where EC2 instances, outside the cluster, reach the worker API. operator.ec2ApiUrl,
else the Ingress's URL, else empty (the operator then uses --api-url, the in-cluster Service,
which is right for no EC2 instance: a chart EC2 pool then fails the install, below).
*/}}
{{- define "testlooper.ec2ApiUrl" -}}
{{- if .Values.operator.ec2ApiUrl -}}
{{- .Values.operator.ec2ApiUrl | trimSuffix "/" -}}
{{- else if .Values.ingress.enabled -}}
{{- printf "%s://%s" (ternary "https" "http" (not (empty .Values.ingress.tls.secretName))) .Values.ingress.host -}}
{{- end -}}
{{- end -}}
