/** What the benchmark and its simulator process agree on. */

export const benchModel = (i: number): string => `bench-${String(i).padStart(2, '0')}`
export const benchGpuId = (i: number): string => String(i + 1)

export type SimulatorCommand =
  | { type: 'reset' }
  | { type: 'report', gpuId: string }
  | { type: 'close' }

export type SimulatorReply =
  | { type: 'ready', ports: number[] }
  | { type: 'reset' }
  /** Since the last reset, on one GPU: idle gaps, busy times (ms) and works started; overlaps on any GPU. */
  | { type: 'report', gaps: number[], busy: number[], starts: number, overlaps: number }

/** The last simulator runs 4 requests at once (OLLAMA_NUM_PARALLEL 4), each taking real time. */
export const WIDE_SLOTS = 4
export const WIDE_TOKENS = 5
export const WIDE_TOKEN_MS = 10

/**
 * The inventory file for `count` single-GPU assignments, one model each, on the simulators'
 * ports; the last one (the capacity-4 server) with `"parallel": 4`.
 */
export function inventoryFile (ports: number[]): object {
  return {
    computers: [{ id: 1, name: 'bench', ip: '127.0.0.1' }],
    gpus: ports.map((_, i) => ({ id: Number(benchGpuId(i)), computer: 1, name: `gpu ${i}`, weight: 1 })),
    assignments: ports.map((port, i) => ({
      id: i + 1,
      name: `sim-${i}`,
      model: benchModel(i),
      kind: 'llm',
      port,
      gpus: [Number(benchGpuId(i))],
      ...(i === ports.length - 1 ? { parallel: WIDE_SLOTS } : {})
    }))
  }
}

/**
 * (j): one Ollama server serving SHARED_MODELS models on GPU 1, one assignment per model (as the
 * original schema records it), beside one serving a single model on GPU 2.
 */
export const SHARED_MODELS = 1000
export const sharedModel = (i: number): string => `shared-${String(i).padStart(4, '0')}`
export const SINGLE_MODEL = 'single'
export const SHARED_GPU = '1'
export const SINGLE_GPU = '2'

/** (j)'s inventory: `ports` are the shared server's and the single-model server's. */
export function sharedInventoryFile (ports: number[]): object {
  return {
    computers: [{ id: 1, name: 'bench', ip: '127.0.0.1' }],
    gpus: [SHARED_GPU, SINGLE_GPU].map((id) => ({ id: Number(id), computer: 1, name: `gpu ${id}`, weight: 1 })),
    assignments: [
      ...Array.from({ length: SHARED_MODELS }, (_, i) => ({
        id: i + 1, name: `shared-${i}`, model: sharedModel(i), kind: 'llm', port: ports[0], gpus: [Number(SHARED_GPU)]
      })),
      { id: SHARED_MODELS + 1, name: 'single', model: SINGLE_MODEL, kind: 'llm', port: ports[1], gpus: [Number(SINGLE_GPU)] }
    ]
  }
}
