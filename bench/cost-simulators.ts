/**
 * The child process behind bench/cost-fleet.ts: `servers` Ollama simulators with the cost model,
 * one GPU each, none of the models resident at the start. Reports what they computed since the
 * last mark, each request tagged from its prompt.
 */
import { startSimulator, type RecordedRequest, type Simulator } from '../test/helpers/upstream-simulator.js'
import { tagOf, type CostFleetCommand, type CostFleetOptions, type CostFleetReply, type CostReport, type TaggedRecord } from './cost-fleet.js'

const opts = JSON.parse(process.argv[2]) as CostFleetOptions
const simulators: Simulator[] = []
for (let i = 0; i < opts.servers; i++) {
  simulators.push(await startSimulator({ gpuIds: [String(i + 1)], models: opts.models, tokens: opts.tokens, cost: opts.cost }))
}

/** per server: its cost records and loads counted up to the last mark */
let marks = simulators.map(() => ({ records: 0, loads: 0 }))

/**
 * The recorded request each cost record belongs to: the last one that arrived before the record's
 * request began (the simulator records a request and begins it in one synchronous step).
 */
function requestAt (requests: RecordedRequest[], arrivedAt: number): RecordedRequest | undefined {
  let lo = 0
  let hi = requests.length - 1
  let found: RecordedRequest | undefined
  while (lo <= hi) {
    const mid = (lo + hi) >> 1
    if (requests[mid].at <= arrivedAt) { found = requests[mid]; lo = mid + 1 } else hi = mid - 1
  }
  return found
}

function report (): CostReport {
  const out: CostReport = { computedPromptTokens: 0, cachedPromptTokens: 0, loads: 0, records: [] }
  simulators.forEach((sim, server) => {
    const stats = sim.costs()
    const records = stats.requests.slice(marks[server].records)
    out.loads += sim.loads.length - marks[server].loads
    const chats = sim.requests.filter((r) => r.method === 'POST')
    for (const r of records) {
      out.computedPromptTokens += r.computedTokens
      out.cachedPromptTokens += r.cachedTokens
      const tagged: TaggedRecord = {
        server,
        tag: tagOf(requestAt(chats, r.arrivedAt)?.body),
        model: r.model,
        promptTokens: r.promptTokens,
        computedTokens: r.computedTokens,
        cachedTokens: r.cachedTokens,
        evalCount: r.evalCount,
        loadMs: r.loadMs,
        ttftMs: r.ttftMs
      }
      out.records.push(tagged)
    }
  })
  return out
}

const send = (reply: CostFleetReply): void => { process.send?.(reply) }

process.on('message', (command: CostFleetCommand) => {
  switch (command.type) {
    case 'mark':
      marks = simulators.map((sim) => ({ records: sim.costs().requests.length, loads: sim.loads.length }))
      send({ type: 'mark' })
      break
    case 'report':
      send({ type: 'report', report: report() })
      break
    case 'close':
      void Promise.all(simulators.map(async (s) => await s.close())).then(() => process.exit(0))
      break
  }
})
process.on('disconnect', () => process.exit(0))

send({ type: 'ready', ports: simulators.map((s) => s.port) })
