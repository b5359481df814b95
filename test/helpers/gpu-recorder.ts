// The recorder lives in scripts/simulator/ with the simulators; tests import it from here.
export * from '../../scripts/simulator/gpu-recorder.js'
