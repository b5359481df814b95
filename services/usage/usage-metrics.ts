/**
 * `/metrics` counters of usage recorded on this replica: `maestro_tokens_total{client,model,direction}`
 * and `maestro_gpu_seconds_total{assignment}`. Names come from clients: past LABEL_LIMIT distinct
 * values of a label, new ones count as `other` (as the request metrics do for models,
 * which are labelled by their matching key here too: `llama3:latest` as `llama3`).
 */
import { Counter, type Registry } from 'prom-client'
import { modelKey } from '../fleet/model-name.js'
import type { normaliseEntry } from './usage-ledger.js'

const LABEL_LIMIT = 200
/** Distinct names whose counts wait for the next read of /metrics at most. */
const PENDING_MAX = 1000

function boundedLabel (): (value: string) => string {
  const seen = new Set<string>()
  return (value) => {
    if (seen.has(value)) return value
    if (seen.size >= LABEL_LIMIT) return 'other'
    seen.add(value)
    return value
  }
}

/** Registers the counters in `registry`; the function it answers counts one recorded entry. */
export function usageMetrics (registry: Registry): (entry: ReturnType<typeof normaliseEntry>) => void {
  // Counts gather here and reach the counters when /metrics is read: prom-client hashes a label
  // object on every inc, which cost more than the rest of recording a request.
  /** client → model → tokens since the last read */
  const pendingTokens = new Map<string, Map<string, { prompt: number, output: number }>>()
  let pendingCells = 0
  const pendingSeconds = new Map<string, number>()
  const tokens = new Counter({
    name: 'maestro_tokens_total',
    help: 'Tokens of the requests this replica answered, by client (API key name, else address), model and direction (prompt: the whole prompt, cached part included; output)',
    labelNames: ['client', 'model', 'direction'] as const,
    registers: [registry],
    collect: () => flushTokens()
  })
  const gpuSeconds = new Counter({
    name: 'maestro_gpu_seconds_total',
    help: 'Seconds the requests this replica answered held a GPU lease, by assignment',
    labelNames: ['assignment'] as const,
    registers: [registry],
    collect: () => flushSeconds()
  })
  const flushTokens = (): void => {
    for (const [clientName, byModel] of pendingTokens) {
      const c = client(clientName)
      for (const [modelName, p] of byModel) {
        const m = model(modelKey(modelName))
        if (p.prompt > 0) tokens.inc({ client: c, model: m, direction: 'prompt' }, p.prompt)
        if (p.output > 0) tokens.inc({ client: c, model: m, direction: 'output' }, p.output)
      }
    }
    pendingTokens.clear()
    pendingCells = 0
  }
  const flushSeconds = (): void => {
    for (const [a, held] of pendingSeconds) gpuSeconds.inc({ assignment: assignment(a) }, held)
    pendingSeconds.clear()
  }
  const client = boundedLabel()
  const model = boundedLabel()
  const assignment = boundedLabel()
  return (entry) => {
    const { promptTokens, outputTokens, gpuSeconds: held } = entry.counts
    if (promptTokens > 0 || outputTokens > 0) {
      let byModel = pendingTokens.get(entry.client)
      let p = byModel?.get(entry.model)
      if (p === undefined) {
        // many names and no read of /metrics: into the counters now, so the map stays small
        if (pendingCells >= PENDING_MAX) {
          flushTokens()
          byModel = undefined
        }
        if (byModel === undefined) pendingTokens.set(entry.client, byModel = new Map())
        byModel.set(entry.model, p = { prompt: 0, output: 0 })
        pendingCells++
      }
      p.prompt += promptTokens
      p.output += outputTokens
    }
    if (held > 0 && pendingSeconds.size >= PENDING_MAX && !pendingSeconds.has(entry.assignment)) flushSeconds()
    if (held > 0) pendingSeconds.set(entry.assignment, (pendingSeconds.get(entry.assignment) ?? 0) + held)
  }
}
