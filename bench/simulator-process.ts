/**
 * The benchmark's upstream fleet, in a process of its own so that it does not share an event loop
 * with the load generator: `count` Ollama simulators (the tests' simulator, one GPU each, one model
 * each) recording on one GpuRecorder. Driven by the benchmark over the IPC channel.
 * With `shared` as its argument: (j)'s two servers instead, one serving SHARED_MODELS models on
 * one GPU and one serving a single model (every model resident, so that no load time is measured).
 */
import { GpuRecorder, startSimulator, type Simulator } from '../test/helpers/upstream-simulator.js'
import {
  SHARED_GPU, SHARED_MODELS, SINGLE_GPU, SINGLE_MODEL, WIDE_SLOTS, WIDE_TOKEN_MS, WIDE_TOKENS, benchGpuId, benchModel, sharedModel,
  type SimulatorCommand, type SimulatorReply
} from './fleet.js'

const recorder = new GpuRecorder()
const simulators: Simulator[] = []
if (process.argv[2] === 'shared') {
  const models = Array.from({ length: SHARED_MODELS }, (_, i) => sharedModel(i))
  simulators.push(await startSimulator({
    gpuIds: [SHARED_GPU], recorder, models, resident: models, maxLoadedModels: SHARED_MODELS, tokens: 3, tokenDelayMs: 0
  }))
  simulators.push(await startSimulator({
    gpuIds: [SINGLE_GPU], recorder, models: [SINGLE_MODEL], resident: [SINGLE_MODEL], tokens: 3, tokenDelayMs: 0
  }))
} else {
  const count = Number(process.argv[2] ?? 64)
  for (let i = 0; i < count; i++) {
    simulators.push(await startSimulator({
      gpuIds: [benchGpuId(i)], recorder, models: [benchModel(i)], tokens: 3, tokenDelayMs: 0
    }))
  }
  // one more: the capacity-4 server of scenario (f), its model resident
  simulators.push(await startSimulator({
    gpuIds: [benchGpuId(count)],
    recorder,
    models: [benchModel(count)],
    resident: [benchModel(count)],
    numParallel: WIDE_SLOTS,
    tokens: WIDE_TOKENS,
    tokenDelayMs: WIDE_TOKEN_MS
  }))
}

const send = (reply: SimulatorReply): void => { process.send?.(reply) }

/** Time each work held its GPUs, from the recorder's start/end pairs. */
function busyTimes (gpuId: string): number[] {
  const started = new Map<string, number>()
  const out: number[] = []
  for (const e of recorder.events) {
    if (!e.gpuIds.includes(gpuId)) continue
    if (e.type === 'start') started.set(e.label, e.at)
    else {
      const at = started.get(e.label)
      if (at !== undefined) out.push(e.at - at)
    }
  }
  return out
}

process.on('message', (command: SimulatorCommand) => {
  switch (command.type) {
    case 'reset':
      recorder.reset()
      for (const s of simulators) s.requests.length = 0 // kept by the simulator for tests; only memory here
      send({ type: 'reset' })
      break
    case 'report': {
      send({
        type: 'report',
        gaps: recorder.idleGaps(command.gpuId),
        busy: busyTimes(command.gpuId),
        starts: recorder.events.filter((e) => e.type === 'start' && e.gpuIds.includes(command.gpuId)).length,
        overlaps: recorder.overlaps.length
      })
      break
    }
    case 'close':
      void Promise.all(simulators.map(async (s) => await s.close())).then(() => process.exit(0))
      break
  }
})
process.on('disconnect', () => process.exit(0))

send({ type: 'ready', ports: simulators.map((s) => s.port) })
