{{/*
The chart renders deploy/base (reached through the chart's base/ link, the
one source of every object) with the values applied: the objects are read
from those files and changed here, not written a second time.
*/}}

{{/* The objects of one YAML file of the chart, as a YAML list. */}}
{{- define "lvmlocal.load" -}}
{{- $objects := list -}}
{{- range $doc := splitList "\n---\n" (.root.Files.Get .path) -}}
{{- $object := fromYaml $doc -}}
{{- if $object.kind -}}
{{- $objects = append $objects $object -}}
{{- end -}}
{{- end -}}
{{- toYaml $objects -}}
{{- end -}}

{{/* Labels every object gets: the base's part-of, and Helm's. */}}
{{- define "lvmlocal.labels" -}}
app.kubernetes.io/part-of: lvmlocal
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* One object as a YAML document, with the labels and the namespace. */}}
{{- define "lvmlocal.emit" -}}
{{- $object := .object -}}
{{- $metadata := $object.metadata -}}
{{- $labels := merge (default dict $metadata.labels) (include "lvmlocal.labels" .root | fromYaml) -}}
{{- $_ := set $metadata "labels" $labels -}}
{{- if hasKey $metadata "namespace" -}}
{{- $_ := set $metadata "namespace" .root.Values.namespace.name -}}
{{- end }}
---
{{ toYaml $object }}
{{- end -}}

{{/* The key in .Values.images and .Values.resources of each container. */}}
{{- define "lvmlocal.containerKeys" -}}
agent: agent
liveness-probe: livenessProbe
controller: controller
csi-provisioner: provisioner
csi-resizer: resizer
csi-snapshotter: snapshotter
scheduler: scheduler
{{- end -}}
